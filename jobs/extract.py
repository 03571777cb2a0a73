"""`featmap extract`: a pipeline over a folder of images, in shards, to one output file.

Inputs are processed in shards of `shard_size` images. Each finished shard is written to
`<output>.parts/` (its results, then a manifest naming the shard, its inputs and the pipeline
id), so that `resume=True` can reuse it after an interruption; once every shard is done they
are merged into the output, written atomically, and the parts are removed.

Images of different sizes are batched by size (never cropped or padded); each image keeps its
own row in input order.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import itertools
import json
import os
import shutil
import socket
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from featmap.client.channel import ChannelSecurity
from featmap.client.client import FeatmapRpcError
from featmap.contract.errors import FeatmapError
from featmap.contract.limits import DEFAULT_LIMITS
from featmap.contract.ops import layer_costs
from featmap.contract.pixels import PIXEL_DTYPE, pixel_pipeline, pixel_values
from featmap.contract.precision import QuantizationReport
from featmap.contract.spec import Pipeline, content_id
from featmap.contract.tensors import single_image_size
from featmap.jobs.arguments import security_from_arguments
from featmap.jobs.calibration import job_calibration
from featmap.jobs.feed import SizeGroups, load_ahead
from featmap.jobs.images import InputError, InputItem, expand, find_files, load_item
from featmap.jobs.outputs import (
    OUTPUT_SUFFIXES,
    Contents,
    Results,
    atomic_path,
    read_npz,
    write_merged,
    write_npz,
)
from featmap.jobs.specfile import SpecFileError, load_weight_tensors

if TYPE_CHECKING:
    from featmap.service.extractor import Target

OnError = Literal["skip", "fail"]
# Arrays of the .npz layout that an output name must not shadow.
RESERVED_OUTPUT_NAMES = frozenset({"paths", "outputs", "skipped", "skipped_errors"})


class JobError(Exception):
    """The job cannot go on; `exit_code` is 2 for a usage error, 1 for a failure."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Runner(Protocol):
    """Runs the pipeline on batches, yielding each batch's outputs in order.

    A batch in the pipeline's input dtype runs through the pipeline; a uint8 batch of a float
    pipeline holds image pixels and runs through the pipeline's pixel variant
    (featmap.contract.pixels), which gives the features the pipeline's rule for pixels does.
    """

    def run(self, batches: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Outputs of each batch, in order."""
        ...

    def close(self) -> None:
        """Release sessions or channels."""
        ...


def pipelines_by_dtype(pipeline: Pipeline) -> dict[str, Pipeline]:
    """The pipeline for each batch dtype a runner takes: its own, and uint8 pixels."""
    return {pipeline.input.dtype: pipeline, PIXEL_DTYPE: pixel_pipeline(pipeline)}


def calibration_by_dtype(
    pipeline: Pipeline, images: np.ndarray | None
) -> dict[str, np.ndarray | None]:
    """An int8 pipeline's calibration images for each batch dtype a runner takes.

    Pixels (uint8, from image files) calibrate the pixel variant as they are and the pipeline
    itself as its input values; images in the pipeline's own dtype (array files) calibrate the
    pipeline only, and the pixel variant then takes the synthetic set (None).
    """
    if images is None:
        return {}
    if images.dtype.name == PIXEL_DTYPE and pipeline.input.dtype != PIXEL_DTYPE:
        return {PIXEL_DTYPE: images, pipeline.input.dtype: pixel_values(images, pipeline.input)}
    return {pipeline.input.dtype: images}


# --------------------------------------------------------------------------- runners


class EmbeddedRunner:
    """The server's admission, graph builder, session cache and run path, in this process.

    The limits are the server's defaults (featmap.contract.limits), not FEATMAP_* from the
    environment: this is no server. `tensors` are the weights a spec names as {"tensor": ...};
    `calibration` the images an int8 pipeline is calibrated on (None: the synthetic ones), and
    `report` what int8 was measured to cost (None for float32). Sessions are built on first
    use: a job of image files builds only the pixel variant's (an int8 one: the variant of the
    calibration images' dtype, at once, so that its report is known before the job runs).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        threads: int = 0,
        tensors: Mapping[str, np.ndarray] | None = None,
        calibration: np.ndarray | None = None,
    ) -> None:
        # The runtime is imported here, when used: the client alone never loads onnxruntime.
        from featmap.service.extractor import Extractor
        from featmap.service.runtime import SessionCache, resolve_providers
        from featmap.service.weights import check_tensors

        self.pipeline = pipeline
        self.pipelines = pipelines_by_dtype(pipeline)
        # Spinning off: the job decodes images on threads beside onnxruntime, and pool threads
        # spinning between parallel sections take the cores the decoders need. Measured on 2
        # cores (1,536 JPEGs, 224x224): spinning on, 7.3 CPU ms per image and a quarter fewer
        # images/s; off, 6.4 ms. Waking a pool thread costs microseconds per batch of 32.
        cache = SessionCache(len(self.pipelines), resolve_providers(None), threads, spinning=False)
        self.extractor = Extractor(cache, DEFAULT_LIMITS)
        for each in self.pipelines.values():
            self.extractor.admit(each)
        self.weights = check_tensors(pipeline, tensors or {})
        self.calibrations = calibration_by_dtype(pipeline, calibration)
        for dtype, images in self.calibrations.items():
            if images is not None:
                self.extractor.admit_calibration(self.pipelines[dtype], images)
        self.targets: dict[str, Target] = {}
        self.report: QuantizationReport | None = None
        if pipeline.precision == "int8":
            # The session of the dtype the calibration came in (pixels: the one image files use).
            first = calibration.dtype if calibration is not None else pipeline.input.dtype
            compiled = self.target(np.empty((0,), dtype=first)).compiled
            self.report = None if compiled is None else compiled.report

    def target(self, batch: np.ndarray) -> Target:
        """What a batch of this dtype runs as (the session built on first use)."""
        from featmap.service.extractor import Target

        dtype = batch.dtype.name
        target = self.targets.get(dtype)
        if target is None:
            pipeline = self.pipelines.get(dtype, self.pipeline)  # admit_batch names a bad dtype
            calibration = self.calibrations.get(dtype)
            compiled = self.extractor.cache.get(pipeline, self.weights, calibration)
            target = self.targets[dtype] = Target(pipeline, compiled, None)
        return target

    def run(self, batches: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Each batch's outputs (no reply to fit in a message: reply_in_message off)."""
        for batch in batches:
            yield self.extractor.extract(self.target(batch), batch, reply_in_message=False).outputs

    def close(self) -> None:
        """Nothing to release beyond what the garbage collector does."""


def grpc_target(servers: Sequence[str]) -> tuple[str, bool]:
    """(target, load balanced) for --server values: one target, or several IP host:ports."""
    if len(servers) == 1:
        return servers[0], servers[0].startswith("dns:")
    addresses: list[tuple[str, str]] = []
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise JobError(
                f"--server {server!r}: several servers must be given as IP host:port "
                "(gRPC's ipv4:/ipv6: target lists); for a host name with several addresses "
                "give one dns:///name:port target instead",
                exit_code=2,
            ) from None
        if not port.isdigit():
            raise JobError(f"--server {server!r}: expected host:port", exit_code=2)
        addresses.append((f"ipv{ip.version}", f"[{ip}]:{port}" if ip.version == 6 else server))
    schemes = {scheme for scheme, _ in addresses}
    if len(schemes) != 1:
        raise JobError(
            "--server: gRPC cannot balance over IPv4 and IPv6 addresses together", exit_code=2
        )
    return f"{schemes.pop()}:{','.join(address for _, address in addresses)}", True


def target_addresses(servers: Sequence[str]) -> list[str]:
    """Every host:port the --server values reach (a dns:/// name resolved here, as gRPC would)."""
    addresses: list[str] = []
    for server in servers:
        if not server.startswith("dns:"):
            addresses.append(server)
            continue
        host, _, port = server.removeprefix("dns:").lstrip("/").rpartition(":")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            raise JobError(f"--server {server!r}: cannot resolve {host!r}: {exc}") from None
        for info in infos:
            ip = str(info[4][0])
            address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            if address not in addresses:
                addresses.append(address)
    return addresses


class RemoteRunner:
    """Batches sent through FeatureClient, `in_flight` requests at a time.

    A spec with {"tensor": NAME} weights, an int8 spec, or one given a `name`, is registered
    (with `tensors` and `calibration`, under `name`) on every address the servers resolve to (a
    registered pipeline lives in one server's memory), then run by id; `report` is what int8
    was measured to cost on the first server (None for float32).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        servers: Sequence[str],
        in_flight: int,
        timeout: float,
        security: ChannelSecurity | None = None,
        tensors: Mapping[str, np.ndarray] | None = None,
        name: str | None = None,
        replace_name: bool = False,
        calibration: np.ndarray | None = None,
    ) -> None:
        from featmap.client.client import FeatureClient

        target, balanced = grpc_target(servers)
        security = security or ChannelSecurity()
        options: dict[str, Any] = {
            "timeout": timeout,
            "tls": security.tls,
            "tls_ca": security.tls_ca,
            "tls_cert": security.tls_cert,
            "tls_key": security.tls_key,
            "tls_server_name": security.tls_server_name,
            "token": security.token,
        }
        self.client = FeatureClient(target, in_flight=in_flight, load_balancing=balanced, **options)
        self.pipeline = pipeline
        self.pipelines: dict[str, Pipeline | str] = dict(pipelines_by_dtype(pipeline))
        self.report: QuantizationReport | None = None
        calibrations = calibration_by_dtype(pipeline, calibration)
        # int8 is registered too: once, with its error checked up front, not at each request.
        if tensors or pipeline.tensor_names or name or pipeline.precision == "int8":
            for address in target_addresses(servers):
                with FeatureClient(address, **options) as replica:
                    for dtype, each in pipelines_by_dtype(pipeline).items():
                        # The name goes to the user's pipeline, not to its pixel variant.
                        named = each is pipeline
                        self.pipelines[dtype] = pipeline_id = replica.register(
                            each,
                            tensors,
                            name=name if named else None,
                            replace=replace_name and named,
                            calibration=calibrations.get(dtype),
                        )
                        if pipeline.precision == "int8" and self.report is None:
                            self.report = replica.get_pipeline(pipeline_id).int8

    def run(self, batches: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Each batch's outputs from the server(s), in order.

        Consecutive batches of one dtype share one extract_iter, `in_flight` requests deep.
        """
        for dtype, group in itertools.groupby(batches, key=lambda batch: batch.dtype.name):
            # An unexpected dtype goes with the pipeline: the server names images.dtype.
            pipeline = self.pipelines.get(dtype, self.pipelines[self.pipeline.input.dtype])
            yield from self.client.extract_iter(group, pipeline)

    def close(self) -> None:
        """Close the channel."""
        self.client.close()


# --------------------------------------------------------------------------- the job


@dataclass
class JobReport:
    """What a finished job did."""

    output: Path
    images: int
    skipped: list[tuple[str, str]]
    shards: int
    shards_reused: int
    images_computed: int = 0


@dataclass(frozen=True)
class Shard:
    """Consecutive inputs processed, saved and resumed together."""

    index: int
    items: list[InputItem]

    @property
    def keys(self) -> list[str]:
        """The inputs' keys, as the manifest records them."""
        return [item.key for item in self.items]


class PartsDir:
    """`<output>.parts/`: finished shards and their manifests."""

    def __init__(self, output: Path, identity: dict[str, Any]) -> None:
        self.path = output.with_name(output.name + ".parts")
        self.identity = identity

    def _files(self, shard: Shard) -> tuple[Path, Path]:
        stem = self.path / f"shard-{shard.index:05d}"
        return stem.with_suffix(".npz"), stem.with_suffix(".json")

    def results_file(self, shard: Shard) -> Path:
        """Where a shard's results are saved."""
        return self._files(shard)[0]

    def reusable(self, shard: Shard) -> Results | None:
        """A finished shard's results, if its manifest matches this job exactly."""
        results_file, manifest_file = self._files(shard)
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
            if manifest != {**self.identity, "shard": shard.index, "paths": shard.keys}:
                return None
            return read_npz(results_file)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # missing or damaged: compute the shard again

    def save(self, shard: Shard, results: Results) -> None:
        """Results first, manifest last: a manifest vouches for a complete results file."""
        self.path.mkdir(parents=True, exist_ok=True)
        results_file, manifest_file = self._files(shard)
        write_npz(results, results_file)
        manifest = {**self.identity, "shard": shard.index, "paths": shard.keys}
        with atomic_path(manifest_file) as temporary:
            temporary.write_text(json.dumps(manifest), encoding="utf-8")

    def count(self) -> int:
        """Shards whose manifest was written (finished, unless damaged since)."""
        return len(list(self.path.glob("shard-*.json"))) if self.path.is_dir() else 0

    def clear(self) -> None:
        """Remove the parts folder and everything in it."""
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class _ShardRun:
    """A shard on its way through the job: what came back so far, and what is still out."""

    shard: Shard
    outputs: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    rejected: dict[int, InputError] = field(default_factory=dict)
    out: int = 0  # batches sent whose outputs have not come back
    fed: bool = False  # every input was loaded and every batch sent
    failure: JobError | None = None  # an input failed with --on-error fail

    def results(self, output_names: list[str]) -> Results:
        """The shard's results, in input order; rejected inputs as skipped."""
        results = Results(output_names)
        for position, item in enumerate(self.shard.items):
            if position in self.outputs:
                results.add(item.key, self.outputs[position])
            elif position in self.rejected:
                error = self.rejected[position]
                results.skipped.append((error.path, error.reason))
        return results


class Job:
    """One `featmap extract` run; see run_extract.

    Inputs are decoded on `decode_threads` threads at most `prefetch` images ahead of the
    runner, grouped by size into batches per shard, and sent to the runner as one stream of
    batches, so that decoding, the wire and onnxruntime overlap across shard boundaries.
    Image files go as uint8 pixels (the pipeline's pixel variant runs them).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        runner: Runner,
        *,
        resize: tuple[int, int] | None,
        batch_size: int,
        on_error: OnError,
        progress: Callable[[int], None],
        decode_threads: int = 0,
        prefetch: int = 0,
        draft: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.runner = runner
        self.resize = resize
        self.batch_size = batch_size
        self.on_error = on_error
        self.progress = progress
        self.decode_threads = decode_threads
        self.prefetch = prefetch or 2 * batch_size
        self.draft = draft
        self.images_computed = 0

    def fits(self, image: np.ndarray) -> str | None:
        """Why the pipeline cannot take an image of this size (None if it can)."""
        _, height, width = single_image_size(self.pipeline.input.layout, image.shape)
        try:
            layer_costs(self.pipeline, height, width)
        except FeatmapError as exc:
            return str(exc)
        return None

    def load(self, item: InputItem) -> np.ndarray | InputError:
        """One input as the runner takes it, or why it cannot be used (on a decode thread)."""
        try:
            image = load_item(item, self.pipeline.input, self.resize, draft=self.draft)
            reason = self.fits(image)
            if reason is not None:
                raise InputError(item.key, f"{list(image.shape)} is too small: {reason}")
        except InputError as exc:
            return exc
        return image

    def _feed(
        self, runs: list[_ShardRun], sent: collections.deque[tuple[_ShardRun, list[int]]]
    ) -> Iterator[np.ndarray]:
        """The shards' batches, in order; each noted in `sent` as it goes to the runner."""
        entries = ((run, position) for run in runs for position in range(len(run.shard.items)))

        def load(entry: tuple[_ShardRun, int]) -> tuple[_ShardRun, int, np.ndarray | InputError]:
            run, position = entry
            return run, position, self.load(run.shard.items[position])

        loaded = load_ahead(entries, load, self.decode_threads, self.prefetch)
        groups = SizeGroups(self.batch_size)
        with contextlib.closing(loaded):
            for run, position, image in loaded:
                if isinstance(image, InputError):
                    self.progress(1)
                    if self.on_error == "fail":
                        # Stop feeding; the batches already out come back and their shards
                        # are saved before the job fails.
                        run.failure = JobError(f"{image.path}: {image.reason}")
                        return
                    run.rejected[position] = image
                elif (batch := groups.add(position, image)) is not None:
                    run.out += 1
                    sent.append((run, batch.positions))
                    yield batch.array
                if position == len(run.shard.items) - 1:
                    # Counted out before they go, so the shard is not taken for finished
                    # between its last batches.
                    last = list(groups.flush())
                    run.out += len(last)
                    run.fed = True
                    for batch in last:
                        sent.append((run, batch.positions))
                        yield batch.array

    def run(self, shards: Sequence[Shard]) -> Iterator[tuple[Shard, Results]]:
        """Compute the shards; yield each one's results as soon as it is complete, in order."""
        runs = [_ShardRun(shard) for shard in shards]
        waiting = collections.deque(runs)
        sent: collections.deque[tuple[_ShardRun, list[int]]] = collections.deque()
        names = self.pipeline.output_names

        def finished() -> Iterator[tuple[Shard, Results]]:
            while waiting and waiting[0].fed and not waiting[0].out:
                done = waiting.popleft()
                results = done.results(names)
                done.outputs, done.rejected = {}, {}  # the job keeps no shard's outputs
                yield done.shard, results

        outputs = self.runner.run(self._feed(runs, sent))
        try:
            for batch_outputs in outputs:
                run, positions = sent.popleft()
                for row, position in enumerate(positions):
                    # Copies: a row must not keep its whole batch's output alive.
                    run.outputs[position] = {n: np.array(a[row]) for n, a in batch_outputs.items()}
                run.out -= 1
                self.images_computed += len(positions)
                self.progress(len(positions))
                yield from finished()
        except FeatmapError as exc:  # FeatmapRpcError too
            shard = sent[0][0].shard.index if sent else runs[-1].shard.index
            raise JobError(f"shard {shard}: {exc}") from None
        finally:
            close = getattr(outputs, "close", None)
            if close is not None:
                close()  # stops the feed and its decode threads
        yield from finished()
        failure = next((run.failure for run in runs if run.failure is not None), None)
        if failure is not None:
            raise failure


def run_extract(
    pipeline: Pipeline,
    inputs: Sequence[Path],
    output: Path,
    runner: Runner,
    *,
    resize: tuple[int, int] | None = None,
    batch_size: int = 32,
    shard_size: int = 256,
    on_error: OnError = "fail",
    resume: bool = False,
    progress: bool = False,
    pipeline_id: str | None = None,
    notice: Callable[[str], None] = lambda line: None,
    decode_threads: int | None = None,
    prefetch: int = 0,
    draft: bool = False,
) -> JobReport:
    """Run `pipeline` over `inputs` into `output`; JobError when the job cannot finish.

    Skipped inputs (on_error="skip") are in the report and the output; a failure leaves the
    finished shards in `<output>.parts/` for resume=True, and no output file. `pipeline_id`
    (default: the spec's) names what the shards were computed with: the content id when
    weight tensors come with the spec. `notice` gets lines worth telling the user.
    `decode_threads` (default one per core; 0 decodes on this thread) decode up to `prefetch`
    images ahead (default two batches); `draft` lets JPEGs decode at a reduced scale when
    `resize` shrinks them (see images.decode_image).
    """
    from tqdm import tqdm

    suffix = output.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise JobError(f"--output must end in {', '.join(OUTPUT_SUFFIXES)}: {output}", 2)
    if suffix == ".npy" and len(pipeline.output_names) != 1:
        raise JobError(
            f"a .npy output holds one array; the pipeline has {len(pipeline.output_names)} "
            f"outputs {pipeline.output_names}: write .npz or .parquet",
            2,
        )
    clash = RESERVED_OUTPUT_NAMES & set(pipeline.output_names)
    if clash:
        raise JobError(f"outputs: {sorted(clash)} are reserved names in the output file", 2)
    if batch_size < 1 or shard_size < 1:
        raise JobError("--batch-size and --shard-size must be >= 1", 2)
    if draft and resize is None:
        raise JobError("--jpeg-draft decodes JPEGs at the size --resize asks for: give --resize", 2)
    try:
        files = find_files(inputs)
    except ValueError as exc:
        raise JobError(str(exc), 2) from None
    items, unreadable = expand(files, pipeline.input)
    if not items and not unreadable:
        raise JobError(f"no images or arrays found in {', '.join(map(str, inputs))}", 2)

    identity = {
        "pipeline_id": pipeline_id or pipeline.pipeline_id,
        "resize": list(resize) if resize else None,
        "shard_size": shard_size,
    }
    if draft and resize:
        # Draft decoding changes the pixels: its shards are not a full decode's. (Named only
        # when on, so that the manifests of earlier runs still match.)
        identity["jpeg_draft"] = True
    parts = PartsDir(output, identity)
    if not resume:
        # Stale parts of another run must not be merged into this one.
        finished = parts.count()
        if finished:
            notice(
                f"discarding {finished} finished shards in {parts.path}/ of an earlier run "
                "(rerun with --resume to reuse them)"
            )
        parts.clear()
    shards = [
        Shard(i, items[start : start + shard_size])
        for i, start in enumerate(range(0, len(items), shard_size))
    ]
    contents = Contents(pipeline.output_names)
    for error in unreadable:  # .npy files whose header could not be read
        if on_error == "fail":
            raise JobError(f"{error.path}: {error.reason}")
        contents.skipped_first.append((error.path, error.reason))
    todo: list[Shard] = []
    for shard in shards:
        results = parts.reusable(shard) if resume else None
        if results is None:
            todo.append(shard)
        else:
            contents.add(shard.index, results)
    reused = len(shards) - len(todo)
    # Reused images are where the bar starts, not progress: the rate and the time left are
    # those of the images computed now.
    bar = tqdm(
        total=len(items),
        initial=sum(len(shard.items) for shard in shards) - sum(len(s.items) for s in todo),
        unit="img",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    job = Job(
        pipeline,
        runner,
        resize=resize,
        batch_size=batch_size,
        on_error=on_error,
        progress=bar.update,
        decode_threads=default_decode_threads() if decode_threads is None else decode_threads,
        prefetch=prefetch,
        draft=draft,
    )
    try:
        for shard, results in job.run(todo):
            parts.save(shard, results)
            contents.add(shard.index, results)
    finally:
        bar.close()
    metadata = {**identity, "outputs": pipeline.output_names}
    try:
        write_merged(contents, [parts.results_file(shard) for shard in shards], output, metadata)
    except ValueError as exc:
        raise JobError(str(exc), 2) from None
    parts.clear()
    return JobReport(
        output=output,
        images=len(contents.paths),
        skipped=contents.skipped,
        shards=len(shards),
        shards_reused=reused,
        images_computed=job.images_computed,
    )


def default_decode_threads() -> int:
    """Decode threads: one per core, since Pillow decodes with the GIL released."""
    return os.cpu_count() or 1


# --------------------------------------------------------------------------- command line


def command(args: Any, pipeline: Pipeline, resize: tuple[int, int] | None) -> int:
    """`featmap extract` after argument parsing; JobError(exit_code=2) is a usage error."""
    progress = not args.quiet and (args.progress or sys.stderr.isatty())
    try:
        tensors = {} if args.weights is None else load_weight_tensors(args.weights)
    except SpecFileError as exc:
        raise JobError(str(exc), exit_code=2) from None

    def notice(line: str) -> None:
        print(f"featmap extract: {line}", file=sys.stderr)

    runner: EmbeddedRunner | RemoteRunner
    if args.name and not args.server:
        raise JobError("--name registers the pipeline on servers: it needs --server", 2)
    try:
        calibration = job_calibration(pipeline, args.input, args.calibrate, resize)
    except ValueError as exc:  # --calibrate without int8, or an --input that is not there
        raise JobError(str(exc), exit_code=2) from None
    if calibration is not None and not args.quiet:
        notice(f"calibrating int8 on {calibration.describe()}")
    images = None if calibration is None else calibration.images
    try:
        if args.server:
            runner = RemoteRunner(
                pipeline,
                args.server,
                args.in_flight,
                args.timeout,
                security_from_arguments(args),
                tensors,
                args.name,
                args.replace_name,
                images,
            )
        else:
            runner = EmbeddedRunner(pipeline, args.threads, tensors, images)
    except FeatmapRpcError as exc:  # registering the weights failed on a server
        notice(f"error: {exc}")
        return 1
    except FeatmapError as exc:  # the spec, its weights or the limits, checked here
        raise JobError(str(exc), exit_code=2) from None
    if runner.report is not None and not args.quiet:
        notice(runner.report.describe())
    output = Path(args.output)
    parts = output.with_name(output.name + ".parts")

    try:
        report = run_extract(
            pipeline,
            [Path(p) for p in args.input],
            output,
            runner,
            resize=resize,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            on_error=args.on_error,
            resume=args.resume,
            progress=progress,
            pipeline_id=content_id(pipeline, tensors, images),
            notice=notice,
            decode_threads=args.decode_threads,
            draft=args.jpeg_draft,
        )
    except JobError as exc:
        if exc.exit_code == 2:
            raise
        notice(f"error: {exc}")
        if parts.is_dir():
            notice(f"finished shards are kept in {parts}/; rerun with --resume to continue")
        return exc.exit_code
    except KeyboardInterrupt:
        saved = PartsDir(output, {}).count()
        notice(
            f"interrupted: {saved} finished shards are saved in {parts}/; "
            "rerun with --resume to continue"
        )
        return 130
    finally:
        runner.close()
    if not args.quiet:
        reused = f", {report.shards_reused} of {report.shards} shards reused" if args.resume else ""
        notice(f"wrote {report.images} images to {report.output}{reused}")
    if report.skipped:
        notice(f"skipped {len(report.skipped)} inputs:")
        for path, reason in report.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 3
    return 0
