"""Server settings: defaults, FEATMAP_* environment variables, then `featmap serve` flags."""

from __future__ import annotations

import os

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1 << 20


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
    max_registered_pipelines: int = Field(default=256, ge=1)
    # Dynamic batching defaults (RegisterPipeline may override them per pipeline).
    batching: bool = True
    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_us: int = Field(default=0, ge=0)
    # Shared memory: a client renews its regions within the lease or they are unmapped.
    shared_memory_lease_s: float = Field(default=30.0, gt=0)
    max_shared_memory_regions: int = Field(default=256, ge=0)
    # ExtractStream: request messages a stream may have received but not yet answered.
    stream_window: int = Field(default=4, ge=1)
    max_message_bytes: int = Field(default=64 * MIB, ge=1024)
    max_images_per_request: int = Field(default=4096, ge=1)
    max_pixels_per_image: int = Field(default=8192 * 8192, ge=1)
    max_layers: int = Field(default=128, ge=1)
    # Weights and biases over all conv layers (float32: 4 bytes each).
    max_parameters: int = Field(default=64 * MIB, ge=1)
    # Seconds in-flight calls get to finish after SIGTERM/SIGINT.
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    reflection: bool = False
    log_level: str = "INFO"
