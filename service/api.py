"""The featmap.v1 API as plain functions over its messages: testable without a gRPC server.

server.py only moves messages between gRPC and a FeatureService.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort

from ..contract import __version__
from ..contract.errors import InvalidRequest, InvalidTensor, NotPermitted
from ..contract.limits import (
    ENCODED_FORMATS,
    DeferredBatch,
    check_reply_bytes,
    check_request_bytes,
)
from ..contract.names import PIPELINE_ID_PATTERN, check_pipeline_name
from ..contract.precision import report_message
from ..contract.spec import InputSpec, Pipeline, json_schema_text
from ..contract.tensors import DTYPE_NAMES, OUTPUT_DTYPES, reply_message_bytes, wire_dtype
from ..contract.wire import (
    FramedExtractRequest,
    FramedExtractResponse,
    check_dtype,
    check_shape,
    decode_tensor,
)
from ..v1 import featmap_pb2 as pb
from .batching import BatchingPolicy, DynamicBatcher
from .encoded import ImageDecoder
from .extractor import Extractor, Target
from .graph import OPSET
from .registry import (
    LIST_PAGE_DEFAULT,
    LIST_PAGE_MAX,
    Described,
    PipelineRegistry,
    RegisteredPipeline,
)
from .runtime import (
    CompiledPipeline,
    OnGone,
    SessionCache,
    available_providers,
    resolve_providers,
)
from .security import Caller
from .settings import ServerSettings
from .shared_memory import SharedMemoryRegistry
from .specs import SpecCache
from .store import StoredEntry, open_store
from .weights import check_tensors

OUTPUT_DTYPE_NAMES = {code: name for name, code in OUTPUT_DTYPES.items()}
SPEC_SCHEMA_JSON = json_schema_text()


def policy_from_message(config: pb.BatchingConfig, field: str) -> BatchingPolicy:
    """A BatchingConfig message as a policy, checked."""
    if config.max_batch_size < 1:
        raise InvalidRequest(
            f"{field}.max_batch_size", f"must be >= 1; got {config.max_batch_size}"
        )
    if config.max_queue_delay_us < 0:
        raise InvalidRequest(
            f"{field}.max_queue_delay_us", f"must be >= 0; got {config.max_queue_delay_us}"
        )
    return BatchingPolicy(
        enabled=config.enabled,
        max_batch_size=config.max_batch_size,
        max_queue_delay_us=config.max_queue_delay_us,
    )


def policy_message(policy: BatchingPolicy) -> pb.BatchingConfig:
    """A policy as a BatchingConfig message."""
    return pb.BatchingConfig(
        enabled=policy.enabled,
        max_batch_size=policy.max_batch_size,
        max_queue_delay_us=policy.max_queue_delay_us,
    )


def output_infos(described: RegisteredPipeline | Described) -> list[pb.OutputInfo]:
    """Output descriptions with symbolic dims."""
    return [
        pb.OutputInfo(
            name=name,
            dtype=pb.FLOAT32,
            shape=[pb.Dim(size=d) if isinstance(d, int) else pb.Dim(symbol=d) for d in shape],
        )
        for name, shape in described.output_shapes.items()
    ]


def int8_report(compiled: CompiledPipeline | None) -> pb.Int8Report | None:
    """The error an int8 pipeline measured at registration (None for float32, and for a
    pipeline not compiled here)."""
    report = None if compiled is None else compiled.report
    return None if report is None else report_message(report)


class FeatureService:
    """Everything behind featmap.v1.FeatureExtractor, without the transport."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.limits = settings.request_limits()
        self.cache = SessionCache(
            settings.session_cache_size,
            resolve_providers(settings.providers),
            settings.intra_op_threads,
            spinning=settings.intra_op_spinning,
            budget_bytes=settings.session_cache_bytes,
            limits=self.limits,
            int8_cache_dir=settings.int8_cache_dir,
        )
        self.batcher = DynamicBatcher(settings.concurrent_batches)
        self.extractor = Extractor(
            self.cache, self.limits, self.batcher, run_bytes=settings.run_bytes
        )
        # Per service: admission depends on this server's limits. Inline specs are kept once
        # admitted (a client sending the same text with every request pays for it once; models
        # are frozen, so sharing them is safe); specs to register are parsed, not kept.
        self.inline_specs = SpecCache(self._admit_inline, self.limits, settings.spec_cache_bytes)
        self.specs = SpecCache(self.extractor.admit, self.limits, settings.spec_cache_bytes)
        self.registry = PipelineRegistry(
            self.cache,
            settings.max_registered_pipelines,
            settings.registry_bytes,
            max_names=settings.max_names_per_pipeline,
            store=open_store(settings.pipeline_store, settings.store_tenant_bytes, self.limits),
            admit=self._admit_stored,
            refresh_s=settings.store_refresh_s,
        )
        self.decoder = ImageDecoder(settings.decode_threads)
        self.shared_memory = SharedMemoryRegistry(
            lease_seconds=settings.shared_memory_lease_s,
            max_regions=settings.max_shared_memory_regions,
        )
        self.default_batching = BatchingPolicy(
            enabled=settings.batching,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
        )

    # ------------------------------------------------------------------ extraction

    def target(
        self, request: FramedExtractRequest, caller: Caller, previous: Target | None = None
    ) -> Target:
        """The pipeline a request names (or, in a stream, the one before it named)."""
        message = request.message
        which = message.WhichOneof("pipeline")
        if which == "pipeline_id":
            registered = self.registry.get(message.pipeline_id, tenant=caller.tenant)
            return self.registered_target(registered)
        if which == "spec_json":
            return Target(self.inline_specs.get(message.spec_json), None, self.default_batching)
        if previous is None:
            raise InvalidRequest("pipeline", "set spec_json or pipeline_id")
        return previous

    def registered_target(self, registered: RegisteredPipeline) -> Target:
        """What a registered pipeline runs as: its warm session and its batching."""
        return Target(
            registered.compiled.pipeline,
            registered.compiled,
            registered.batching or self.default_batching,
        )

    def _admit_inline(self, pipeline: Pipeline) -> Pipeline:
        """An inline spec, admitted (it cannot name weight tensors)."""
        pipeline = self.extractor.admit(pipeline)
        if pipeline.tensor_names:
            check_tensors(pipeline, {})  # names the first {"tensor": ...} it cannot have
        return pipeline

    def _admit_stored(self, entry: StoredEntry) -> Pipeline:
        """A stored entry's spec (and calibration), admitted as a registration would be: a
        store file is trusted no more than a request."""
        pipeline = self.specs.parse(entry.spec_json, "spec_json")
        if entry.calibration is not None:
            self.extractor.admit_calibration(pipeline, entry.calibration)
        return pipeline

    def images(
        self, request: FramedExtractRequest, caller: Caller, spec: InputSpec
    ) -> np.ndarray | DeferredBatch:
        """The request's images: a view of the received bytes, or a batch to read once
        admitted (from the client's shared memory, or decoded from `encoded`)."""
        message, framed = request.message, request.images
        if message.HasField("encoded"):
            if framed is not None or message.HasField("images_region"):
                raise InvalidRequest("encoded", "set images or encoded, not both")
            check_request_bytes(request.size, self.limits, "encoded")
            encoded = message.encoded
            resize = (encoded.height, encoded.width) if encoded.height or encoded.width else None
            return self.decoder.batch(encoded.images, resize, encoded.draft, spec, self.limits)
        if message.HasField("images_region"):
            self.check_shared_memory(caller, "images_region")
            if framed is None:
                raise InvalidTensor("images", "is missing: dtype and shape are still needed")
            if framed.data.nbytes:
                raise InvalidTensor("images.data", "must be empty when images_region is set")
            dtype = check_dtype(framed.dtype, "images")
            check_shape(framed.shape, "images", dtype.itemsize)
            return self.shared_memory.images(
                caller.tenant, message.images_region, dtype, framed.shape, "images_region"
            )
        if framed is None:
            raise InvalidTensor("images", "is missing")
        check_request_bytes(request.size, self.limits)
        return framed.array("images")

    def extract(
        self,
        request: FramedExtractRequest,
        target: Target,
        caller: Caller,
        before_run: Callable[[], None] | None = None,
        on_gone: OnGone | None = None,
    ) -> FramedExtractResponse:
        """Run one request's images through its target.

        `before_run` is called after every check, right before onnxruntime; the server passes
        one that raises Abandoned when the caller has gone or its deadline has passed.
        """
        message = request.message
        code = message.output_dtype or pb.FLOAT32
        output_dtype = OUTPUT_DTYPE_NAMES.get(code)
        if output_dtype is None:
            name = DTYPE_NAMES.get(code, code)
            raise InvalidRequest("output_dtype", f"{name} is not FLOAT32 or FLOAT16")
        to_region = message.HasField("output_region")
        if to_region:
            self.check_shared_memory(caller, "output_region")
        if message.HasField("encoded"):
            target = self.decoder.pixel_target(target)
        images = self.images(request, caller, target.pipeline.input)
        result = self.extractor.extract(
            target,
            images,
            output_dtype=output_dtype,
            reply_in_message=not to_region,
            before_run=before_run,
            on_gone=on_gone,
            field="encoded" if message.HasField("encoded") else "images",
        )
        outputs = result.outputs
        response = pb.ExtractResponse(pipeline_id=result.pipeline_id)
        if not to_region:  # admit_batch already made sure the reply fits in a message
            return FramedExtractResponse(response, outputs)
        if result.plan.reply_bytes > message.output_region.byte_size:
            # A region too small for this reply is no error: the outputs come inline, and
            # the client sizes its region from them for the next request.
            check_reply_bytes(
                reply_message_bytes(result.plan.reply_bytes, len(outputs)), self.limits
            )
            return FramedExtractResponse(response, outputs)
        written = self.shared_memory.write(
            caller.tenant, message.output_region, list(outputs.items()), "output_region"
        )
        for name, array in outputs.items():
            response.outputs[name].CopyFrom(
                pb.Tensor(dtype=wire_dtype(array), shape=array.shape)  # type: ignore[arg-type]
            )
            response.output_regions[name].CopyFrom(written[name])
        return FramedExtractResponse(response, {})

    # ------------------------------------------------------------------ shared memory

    def offers_shared_memory(self, caller: Caller) -> bool:
        """Whether `caller` may use shared memory here (check_shared_memory would pass)."""
        return self.settings.shared_memory and caller.local

    def check_shared_memory(self, caller: Caller, field: str) -> None:
        """NotPermitted unless shared memory is on and the caller is on the Unix socket."""
        if self.offers_shared_memory(caller):
            return
        if not self.settings.shared_memory:
            raise NotPermitted(
                field, "shared memory is off on this server (featmap serve --shared-memory)"
            )
        raise NotPermitted(
            field,
            "shared memory is offered only on the server's Unix socket "
            "(connect to unix:<unix_socket>)",
        )

    def register_shared_memory(
        self, request: pb.RegisterSharedMemoryRequest, caller: Caller
    ) -> pb.RegisterSharedMemoryResponse:
        """Open a client's shared-memory object as a region (a lease)."""
        self.check_shared_memory(caller, "region")
        lease = self.shared_memory.register(
            caller.tenant, request.owner, request.region, request.key, request.byte_size
        )
        return pb.RegisterSharedMemoryResponse(lease_seconds=lease)

    def unregister_shared_memory(
        self, request: pb.UnregisterSharedMemoryRequest, caller: Caller
    ) -> pb.UnregisterSharedMemoryResponse:
        """Forget one region of an owner, or all of them."""
        self.check_shared_memory(caller, "region")
        count = self.shared_memory.unregister(caller.tenant, request.owner, request.region)
        return pb.UnregisterSharedMemoryResponse(unregistered=count)

    def renew_shared_memory(
        self, request: pb.RenewSharedMemoryRequest, caller: Caller
    ) -> pb.RenewSharedMemoryResponse:
        """Extend an owner's leases."""
        self.check_shared_memory(caller, "owner")
        regions = self.shared_memory.renew(caller.tenant, request.owner)
        return pb.RenewSharedMemoryResponse(
            regions=regions, lease_seconds=self.shared_memory.lease_seconds
        )

    def close(self) -> None:
        """Forget every shared-memory region; stop the decode threads."""
        self.shared_memory.close()
        self.decoder.close()

    # ------------------------------------------------------------------ registered pipelines

    def register_pipeline(
        self,
        request: pb.RegisterPipelineRequest,
        caller: Caller,
        still_wanted: Callable[[], None] | None = None,
    ) -> pb.RegisterPipelineResponse:
        """Register a spec with its weight tensors for the caller's tenant; compile and warm it.

        `still_wanted` raises Abandoned once the caller has gone: an int8 build stops then.
        """
        # Admitted before its tensors are read or anything is compiled.
        pipeline = self.specs.parse(request.spec_json)
        tensors = {
            name: decode_tensor(tensor, f"weights[{name!r}]")
            for name, tensor in request.weights.items()
        }
        batching = (
            policy_from_message(request.batching, "batching")
            if request.HasField("batching")
            else None
        )
        name = check_pipeline_name(request.name) if request.name else None
        calibration = (
            self.extractor.admit_calibration(
                pipeline, decode_tensor(request.calibration, "calibration")
            )
            if request.HasField("calibration")
            else None
        )
        registered = self.registry.register(
            pipeline,
            tensors,
            batching,
            caller.tenant,
            name=name,
            replace=request.replace,
            calibration=calibration,
            still_wanted=still_wanted,
            spec_json=request.spec_json,
        )
        return pb.RegisterPipelineResponse(
            pipeline_id=registered.pipeline_id,
            outputs=output_infos(registered),
            name=name or "",
            int8=int8_report(registered.compiled),
        )

    def pipeline_info(
        self, described: Described, include_model: bool, caller: Caller
    ) -> pb.PipelineInfo:
        """What GetPipeline and ListPipelines say of one pipeline."""
        compiled = described.compiled
        return pb.PipelineInfo(
            pipeline_id=described.pipeline_id,
            names=self.registry.names(described.pipeline_id, caller.tenant),
            spec_json=described.pipeline.canonical_json(),
            outputs=output_infos(described),
            weight_names=described.weight_names,
            batching=policy_message(described.batching or self.default_batching),
            onnx_model=compiled.model_bytes if include_model and compiled is not None else b"",
            precision=described.pipeline.precision,
            int8=int8_report(compiled),
            loaded=compiled is not None,
        )

    def get_pipeline(self, request: pb.GetPipelineRequest, caller: Caller) -> pb.PipelineInfo:
        """One of the tenant's registered pipelines (NOT_FOUND for any other id)."""
        registered = self.registry.get(request.pipeline_id, tenant=caller.tenant)
        return self.pipeline_info(registered.described(), request.include_model, caller)

    def list_pipelines(
        self, request: pb.ListPipelinesRequest, caller: Caller
    ) -> pb.ListPipelinesResponse:
        """A page of the tenant's pipelines, by id, without model bytes; next_page_token
        says where the next page starts ("" after the last)."""
        if request.page_size < 0:
            raise InvalidRequest(
                "page_size", f"must be >= 0 (0: {LIST_PAGE_DEFAULT}), not {request.page_size}"
            )
        token = request.page_token
        if token and PIPELINE_ID_PATTERN.fullmatch(token) is None:
            raise InvalidRequest("page_token", "not a next_page_token of ListPipelines")
        limit = min(request.page_size or LIST_PAGE_DEFAULT, LIST_PAGE_MAX)
        page, after = self.registry.list(caller.tenant, after=token, limit=limit)
        return pb.ListPipelinesResponse(
            pipelines=[self.pipeline_info(d, include_model=False, caller=caller) for d in page],
            next_page_token=after,
        )

    def delete_pipeline(
        self, request: pb.DeletePipelineRequest, caller: Caller
    ) -> pb.DeletePipelineResponse:
        """Forget one of the tenant's registered pipelines."""
        deleted = self.registry.delete(request.pipeline_id, caller.tenant)
        return pb.DeletePipelineResponse(deleted=deleted)

    # ------------------------------------------------------------------ about the server

    def limits_message(self) -> pb.Limits:
        """The Limits message: every field is the setting of its name, or derived from one."""
        settings = self.settings
        derived = {
            "max_queued_requests": settings.max_queued_requests or 4 * settings.grpc_workers,
            "max_streams": settings.stream_limit,
            "encoded_formats": list(ENCODED_FORMATS),
        }
        fields: dict[str, Any] = {
            field.name: derived[field.name]
            if field.name in derived
            else getattr(settings, field.name)
            for field in pb.Limits.DESCRIPTOR.fields
        }
        return pb.Limits(**fields)

    def server_info(self, caller: Caller | None = None) -> pb.GetServerInfoResponse:
        """What this server runs on and the limits it enforces; whether it offers `caller`
        shared memory (None: no caller, none offered)."""
        settings = self.settings
        return pb.GetServerInfoResponse(
            version=__version__,
            onnxruntime_version=ort.__version__,
            available_providers=available_providers(),
            active_providers=self.cache.providers,
            limits=self.limits_message(),
            onnx_opset=OPSET,
            intra_op_threads=settings.intra_op_threads,
            grpc_workers=settings.grpc_workers,
            default_batching=policy_message(self.default_batching),
            spec_schema_json=SPEC_SCHEMA_JSON,
            shared_memory=caller is not None and self.offers_shared_memory(caller),
        )
