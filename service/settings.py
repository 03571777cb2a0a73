"""Server settings: defaults, FEATMAP_* environment variables, then `featmap serve` flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..contract.limits import DEFAULT_LIMITS, MIB, RequestLimits

GIB = 1024 * MIB


def default_pipeline_store() -> str:
    """$XDG_DATA_HOME/featmap/pipelines, else ~/.local/share/featmap/pipelines."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(data_home) / "featmap" / "pipelines")


def default_grpc_workers() -> int:
    """Handler threads: enough for a full dynamic batch to gather while one runs.

    Handlers spend their time blocked (on the network, on the batcher, or inside
    onnxruntime, whose own intra-op pool does the arithmetic), so they may far outnumber
    cores without oversubscribing them; a request beyond the workers waits in gRPC's queue
    and cannot join a batch.
    """
    return max(64, 8 * (os.cpu_count() or 1))


class ServerSettings(BaseSettings):
    """Everything `featmap serve` can be told; each field is also FEATMAP_<NAME> in the env."""

    model_config = SettingsConfigDict(env_prefix="FEATMAP_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    # Execution providers in priority order; None: CUDA when onnxruntime has it, then CPU.
    providers: list[str] | None = None
    # onnxruntime intra-op threads per session; 0 lets onnxruntime use one per physical core.
    intra_op_threads: int = Field(default=0, ge=0)
    grpc_workers: int = Field(default_factory=default_grpc_workers, ge=1)
    # Spinning intra-op threads burn a core while idle; off leaves it to gRPC and the client.
    intra_op_spinning: bool = False
    session_cache_size: int = Field(default=32, ge=1)
    # Keep int8 models quantized here (with their measured error) in this folder by content id
    # and CPU class (service.int8.cache), so that a restarted server, or a job with the same
    # folder, does not quantize the same pipeline again; None: quantize in memory only.
    int8_cache_dir: Path | None = None
    # Registered pipelines compiled and kept in memory. With a pipeline store this bounds a
    # cache: the least recently used are evicted (the store keeps them) instead of refusing.
    max_registered_pipelines: int = Field(default=256, ge=1)
    # Where registrations are kept (service/store.py): a directory, or an fsspec URL (s3://,
    # gs://, memory://; `pip install "featmap[store-fsspec]"`); "none": in memory only.
    pipeline_store: str | None = Field(default_factory=default_pipeline_store)
    # Names moved and pipelines deleted on another replica are seen within this many seconds.
    store_refresh_s: float = Field(default=2.0, gt=0)
    # Each tenant's bytes in the pipeline store.
    store_tenant_bytes: int = Field(default=GIB, ge=1024)
    # Memory budgets in bytes, estimated before allocating (contract.limits: spec_memory,
    # session_memory): parsed inline specs (and parses in flight), compiled sessions of inline
    # specs (and builds in flight, at their peak), registered pipelines (over all tenants).
    spec_cache_bytes: int = Field(default=256 * MIB, ge=MIB)
    session_cache_bytes: int = Field(default=4 * GIB, ge=MIB)
    registry_bytes: int = Field(default=4 * GIB, ge=MIB)
    # ... and the runs in flight, over all callers: each batch's activations and int8 conv
    # workspace (admit_batch's estimate), held from admission to its reply.
    run_bytes: int = Field(default=4 * GIB, ge=MIB)
    # Dynamic batching defaults (RegisterPipeline may override them per pipeline).
    batching: bool = True
    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_us: int = Field(default=0, ge=0)
    # Batches of one pipeline and image shape in flight at once: 2 lets the next batch form
    # while one runs, so the cores do not idle between batches.
    concurrent_batches: int = Field(default=2, ge=1)
    # Also serve on this Unix domain socket (mode 0600: only the server's user can connect).
    unix_socket: Path | None = None
    # Offer shared memory to callers on unix_socket (never over TCP); off by default.
    shared_memory: bool = False
    # Shared memory: a client renews its regions within the lease or they are forgotten.
    shared_memory_lease_s: float = Field(default=30.0, gt=0)
    max_shared_memory_regions: int = Field(default=256, ge=0)
    # ExtractStream: request messages a stream may have received but not yet answered (and at
    # most max_message_bytes of them, beyond the one in hand).
    stream_window: int = Field(default=4, ge=1)
    # ExtractStream calls at once; None: grpc_workers // 2, so that streams (each holding a
    # handler thread for its life) always leave threads to unary calls.
    max_streams: int | None = Field(default=None, ge=1)
    # A stream that keeps the server waiting this long (no message, or a response it does not
    # take) is ended.
    stream_idle_timeout_s: float = Field(default=30.0, gt=0)
    # The per-request limits; their defaults (and meaning) are featmap.contract.limits'.
    max_message_bytes: int = Field(default=DEFAULT_LIMITS.max_message_bytes, ge=1024)
    max_spec_bytes: int = Field(default=DEFAULT_LIMITS.max_spec_bytes, ge=1024)
    max_images_per_request: int = Field(default=DEFAULT_LIMITS.max_images_per_request, ge=1)
    max_pixels_per_image: int = Field(default=DEFAULT_LIMITS.max_pixels_per_image, ge=1)
    max_layers: int = Field(default=DEFAULT_LIMITS.max_layers, ge=1)
    max_parameters: int = Field(default=DEFAULT_LIMITS.max_parameters, ge=1)
    max_kernel_size: int = Field(default=DEFAULT_LIMITS.max_kernel_size, ge=1)
    max_flops: int = Field(default=DEFAULT_LIMITS.max_flops, ge=1)
    max_activation_bytes: int = Field(default=DEFAULT_LIMITS.max_activation_bytes, ge=1)
    allow_non_finite_input: bool = DEFAULT_LIMITS.allow_non_finite_input
    max_calibration_images: int = Field(default=DEFAULT_LIMITS.max_calibration_images, ge=1)
    max_names_per_pipeline: int = Field(default=DEFAULT_LIMITS.max_names_per_pipeline, ge=1)
    max_encoded_image_bytes: int = Field(default=DEFAULT_LIMITS.max_encoded_image_bytes, ge=1)
    # Threads decoding encoded images (ExtractRequest.encoded), shared by all calls; 0: one a core.
    decode_threads: int = Field(default=0, ge=0)
    # Extract/ExtractStream calls admitted at once (running or waiting for a handler thread);
    # None: 4 x grpc_workers. Beyond it, RESOURCE_EXHAUSTED at once, marked retryable.
    max_queued_requests: int | None = Field(default=None, ge=1)
    # Seconds in-flight calls get to finish after SIGTERM/SIGINT.
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    reflection: bool = False
    log_level: str = "INFO"
    # "json": one JSON object per line on stderr, for log shippers.
    log_format: Literal["text", "json"] = "text"
    # TLS: the server's certificate chain and private key (PEM files); both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Mutual TLS: only clients presenting a certificate signed by this CA (PEM) get through.
    tls_client_ca: Path | None = None
    # Bearer tokens (`authorization: Bearer <token>`); with none set, calls need no token.
    auth_tokens_file: Path | None = None  # one token per line
    # NoDecode: FEATMAP_AUTH_TOKENS is "a,b", not JSON. SecretStr keeps tokens out of reprs.
    auth_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # Prometheus metrics on http://host:metrics_port/metrics; None: off, 0: a free port.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # Spec files registered at start, before the port serves (service/pipeline_dir.py): each
    # under its file's stem; DIR/<tenant>/ for a tenant's. None: none.
    pipelines_dir: Path | None = None
    # A file of pipelines_dir that cannot be registered is logged and left out; by default the
    # server refuses to start (exit status 2), naming the file and the field.
    skip_invalid_pipelines: bool = False

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [token.strip() for token in value.split(",") if token.strip()]
        return value

    @field_validator("pipeline_store")
    @classmethod
    def _store_off(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in ("", "none"):
            return None
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self

    @model_validator(mode="after")
    def _check_local_features(self) -> ServerSettings:
        if self.shared_memory and self.unix_socket is None:
            raise ValueError(
                "shared_memory needs unix_socket: it is offered only to callers proven local"
            )
        if self.max_streams is not None and 1 < self.grpc_workers <= self.max_streams:
            raise ValueError(
                f"max_streams={self.max_streams} must be below grpc_workers={self.grpc_workers}, "
                "so that streams leave handler threads to unary calls"
            )
        return self

    @property
    def stream_limit(self) -> int:
        """ExtractStream calls admitted at once (max_streams, or half the handler threads)."""
        return self.max_streams or max(1, self.grpc_workers // 2)

    def request_limits(self) -> RequestLimits:
        """The per-request limits these settings set."""
        return RequestLimits(
            **{name: getattr(self, name) for name in RequestLimits.__dataclass_fields__}
        )
