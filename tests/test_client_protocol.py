"""The exchanges both clients drive (client/protocol.py), without a server: what each step asks
for, and what it makes of a refusal."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest

from featmap.client.messages import FeatmapRpcError, request_for
from featmap.client.protocol import Call, Pause, Stepper, Steps
from featmap.client.retry import with_retries
from featmap.client.shared_memory import SharedMemoryTransport
from featmap.contract.metadata import RETRYABLE_KEY
from featmap.v1 import featmap_pb2 as pb
from tests.conftest import README_SPEC


class Refusal(grpc.RpcError):
    """An RpcError as a call raises it."""

    def __init__(self, code: grpc.StatusCode, details: str = "", retryable: bool = False):
        self._code, self._details = code, details
        self._trailers = ((RETRYABLE_KEY, "1"),) if retryable else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


def walk(steps: Steps[Any], answers: list[Any]) -> tuple[list[Any], Any]:
    """Drive `steps` as the clients do, answering each action from `answers` in turn (an
    RpcError is raised by the action); the actions asked for, and the result."""
    run, actions = Stepper(steps), []
    while run.action is not None:
        actions.append(run.action)
        with run.failures():
            answer = answers.pop(0) if isinstance(run.action, Call) else None
            if isinstance(answer, grpc.RpcError):
                raise answer
            run.reply(answer)
    return actions, run.result


def method(request: Any, timeout: float | None = None) -> Any:
    raise AssertionError("the exchange never calls; its driver does")


def test_with_retries_pauses_between_attempts_while_the_server_is_busy() -> None:
    busy = Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retryable=True)
    actions, result = walk(with_retries(method, "request", 3, None), [busy, busy, "reply"])
    assert [type(a) for a in actions] == [Call, Pause, Call, Pause, Call]
    assert all(a.request == "request" and a.timeout is None for a in actions if isinstance(a, Call))
    assert result == "reply"


def test_with_retries_gives_up_on_a_final_refusal_and_after_its_retries() -> None:
    invalid = Refusal(grpc.StatusCode.INVALID_ARGUMENT, "no")
    with pytest.raises(FeatmapRpcError) as final:
        walk(with_retries(method, "request", 3, None), [invalid])
    assert final.value.code == grpc.StatusCode.INVALID_ARGUMENT

    gone = Refusal(grpc.StatusCode.UNAVAILABLE, "gone")
    with pytest.raises(FeatmapRpcError) as exhausted:
        walk(with_retries(method, "request", 1, None), [gone, gone])
    assert exhausted.value.code == grpc.StatusCode.UNAVAILABLE


def test_with_retries_passes_the_time_left() -> None:
    actions, _ = walk(with_retries(method, "request", 0, 30.0), ["reply"])
    assert isinstance(actions[0], Call) and actions[0].timeout is not None
    assert 0 < actions[0].timeout <= 30.0


class Stub:
    """A FeatureExtractor stub's shared-memory methods, never called: only named."""

    RegisterSharedMemory = staticmethod(lambda request, timeout=None: method(request))
    RenewSharedMemory = staticmethod(lambda request, timeout=None: method(request))
    Extract = staticmethod(lambda request, timeout=None: method(request))


def called(actions: list[Any]) -> list[str]:
    """Which stub method each Call makes."""
    return [
        next(name for name in ("RegisterSharedMemory", "RenewSharedMemory", "Extract")
             if getattr(Stub, name) is action.method)
        for action in actions
    ]  # fmt: skip


def test_shared_memory_extract_registers_then_extracts_and_again_after_a_lost_lease() -> None:
    images = np.zeros((2, 3, 8, 8), np.float32)
    message = request_for(None, README_SPEC, "float32").message
    transport = SharedMemoryTransport()
    try:
        steps = transport.extract(Stub, images, message, 5.0)
        lease = pb.RegisterSharedMemoryResponse(lease_seconds=30)
        lost = Refusal(grpc.StatusCode.NOT_FOUND, "images region 'x' is not registered")
        answers = [lease, lease, lost, lease, lease, pb.ExtractResponse()]
        actions, outputs = walk(steps, answers)
    finally:
        transport.close()
    # images and outputs regions, the request, the lease lost: both again, the request again
    register, extract = "RegisterSharedMemory", "Extract"
    assert called(actions) == [register, register, extract, register, register, extract]
    assert all(a.timeout is not None and 0 < a.timeout <= 5.0 for a in actions)
    assert outputs == {}


def test_shared_memory_extract_sends_again_while_the_server_is_busy() -> None:
    images = np.zeros((2, 3, 8, 8), np.float32)
    message = request_for(None, README_SPEC, "float32").message
    transport = SharedMemoryTransport()
    busy = Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retryable=True)
    lease = pb.RegisterSharedMemoryResponse(lease_seconds=30)
    try:
        steps = transport.extract(Stub, images, message, None, retries=2)
        actions, outputs = walk(steps, [lease, lease, busy, busy, pb.ExtractResponse()])
        # A third refusal is past two retries: it reaches the caller.
        with pytest.raises(FeatmapRpcError) as refused:
            walk(transport.extract(Stub, images, message, None, retries=2), [busy] * 3)
    finally:
        transport.close()
    assert [type(a) for a in actions] == [Call, Call, Call, Pause, Call, Pause, Call]
    register, extract = "RegisterSharedMemory", "Extract"
    calls = [a for a in actions if isinstance(a, Call)]
    assert called(calls) == [register, register, extract, extract, extract]
    assert outputs == {}
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_shared_memory_extract_lets_other_refusals_out() -> None:
    images = np.zeros((1, 3, 8, 8), np.float32)
    message = request_for(None, README_SPEC, "float32").message
    transport = SharedMemoryTransport()
    lease = pb.RegisterSharedMemoryResponse(lease_seconds=30)
    invalid = Refusal(grpc.StatusCode.INVALID_ARGUMENT, "images.shape")
    try:
        with pytest.raises(FeatmapRpcError) as refused:
            walk(transport.extract(Stub, images, message, None), [lease, lease, invalid])
    finally:
        transport.close()
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_client_plans_replies_with_the_servers_framing() -> None:
    # One rule for a reply's size: the client splits so that data plus the framing the server
    # counts (contract.tensors.reply_message_bytes) fit in max_message_bytes.
    from featmap.client.messages import images_per_message
    from featmap.contract.tensors import reply_message_bytes

    images = np.zeros((4000, 1, 2, 2), np.uint8)
    per_message = images_per_message(images, "{}", 2**20, reply_per_image=1000, outputs=32)
    assert reply_message_bytes(per_message * 1000, 32) <= 2**20
    assert reply_message_bytes((per_message + 1) * 1000, 32) > 2**20
