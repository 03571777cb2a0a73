"""The clients' exchanges with the server as plain generators, written once for both twins.

An exchange (`Steps`) yields what it needs done — a `Call` to make, a `Pause` to wait — and is
sent each call's reply, or has its grpc.RpcError thrown in; it returns the result. It never
waits, sends or sleeps itself: FeatureClient makes each call blocking and AsyncFeatureClient
awaits it (their `_run`, through `Stepper`), so the sequence — retries, shared-memory leases —
cannot drift between them. The exchanges: retry.with_retries,
shared_memory.SharedMemoryTransport.extract and the ListPipelines pages (client._listing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

import grpc

from .messages import FeatmapRpcError

Result = TypeVar("Result")


@dataclass(frozen=True)
class Call:
    """Make `method(request, timeout=timeout)` (a stub's method, or a whole stream) and reply."""

    method: Callable[..., Any]
    request: Any
    timeout: float | None


@dataclass(frozen=True)
class Pause:
    """Wait `seconds` (a retry's backoff), then go on."""

    seconds: float


Action: TypeAlias = Call | Pause
Steps: TypeAlias = Generator[Action, Any, Result]


class Stepper(Generic[Result]):
    """Walks an exchange for a client: `action` is what to do next (None once it has ended).

    The client does `action`, then hands back its reply with `reply`, inside `failures()`, which
    throws a grpc.RpcError the action raised into the exchange instead. An RpcError the exchange
    lets out leaves as FeatmapRpcError; `result` is what it returned.
    """

    def __init__(self, steps: Steps[Result]) -> None:
        self._steps = steps
        self.action: Action | None = None
        self._result: Any = None
        self._advance(steps.send, None)

    @property
    def result(self) -> Result:
        """What the exchange returned (once `action` is None)."""
        assert self.action is None, "the exchange has not ended"
        return self._result  # type: ignore[no-any-return]

    def reply(self, value: Any) -> None:
        """The action went through, with this reply."""
        self._advance(self._steps.send, value)

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """Around an action: a grpc.RpcError it raises goes to the exchange to judge."""
        try:
            yield
        except grpc.RpcError as exc:
            self._advance(self._steps.throw, exc)

    def _advance(self, step: Callable[[Any], Action], value: Any) -> None:
        try:
            self.action = step(value)
        except StopIteration as done:
            self.action, self._result = None, done.value
        except grpc.RpcError as exc:
            self.action = None
            raise FeatmapRpcError.from_rpc_error(exc) from None
