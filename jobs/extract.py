"""`featmap extract`: a pipeline over a folder of images, in shards, to one output file.

Inputs are processed in shards of `shard_size` images. Each finished shard is written to
`<output>.parts/` (its results, then a manifest naming the shard, its inputs and the pipeline
id), so that `resume=True` can reuse it after an interruption; once every shard is done they
are merged into the output, written atomically, and the parts are removed. The shards a job
finishes in its first seconds wait in memory (parts.HeldShards): a short job writes only its
output.

Images of different sizes are batched by size (never cropped or padded); each image keeps its
own row in input order.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract.errors import FeatmapError
from ..contract.spec import Pipeline, content_id
from .calibration import job_calibration
from .images import arrays_only, expand, find_files
from .job import Job, JobError, OnError, Runner
from .outputs import OUTPUT_SUFFIXES, Contents, Part, Results, write_merged
from .parts import CHECKPOINT_AFTER_S, HELD_BYTES, HeldShards, PartsDir, Shard, StreamedRows
from .runners import EmbeddedRunner, RemoteRunner
from .startup import resume_collections

# Arrays of the .npz layout that an output name must not shadow.
RESERVED_OUTPUT_NAMES = frozenset({"paths", "outputs", "skipped", "skipped_errors"})
SAVING = 2  # finished shards whose part files are being written while the job goes on


@dataclass
class JobReport:
    """What a finished job did."""

    output: Path
    images: int
    skipped: list[tuple[str, str]]
    shards: int
    shards_reused: int
    images_computed: int = 0


class _NoProgress:
    """The bar of a job that shows none (tqdm's interface, as the job uses it)."""

    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None


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
    checkpoint_after_s: float | None = None,
    encoded: bool = False,
) -> JobReport:
    """Run `pipeline` over `inputs` into `output`; JobError when the job cannot finish.

    Skipped inputs (on_error="skip") are in the report and the output; a failure leaves the
    finished shards in `<output>.parts/` for resume=True, and no output file. `pipeline_id`
    (default: the spec's) names what the shards were computed with: the content id when
    weight tensors come with the spec. `notice` gets lines worth telling the user.
    `decode_threads` (default_decode_threads; 0 decodes on this thread) decode up to `prefetch`
    images ahead (default two batches); `draft` lets JPEGs decode at a reduced scale when
    `resize` shrinks them (see images.decode_image). Finished shards are saved as parts once
    the job is `checkpoint_after_s` old (default CHECKPOINT_AFTER_S; 0: each as it finishes;
    see HeldShards). `encoded` (a RemoteRunner only): JPEG, PNG and WebP files go as they
    are, for the server to decode by the same rule.
    """
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
    # A .npy's one output is written once, as the shards finish (see StreamedRows); other
    # formats keep each shard as a part file until the merge.
    streamed = (
        StreamedRows(parts.path, identity, pipeline.output_names[0]) if suffix == ".npy" else None
    )
    todo: list[Shard] = []
    if streamed is not None:
        kept = streamed.reusable(shards) if resume else []
        for reused_shard in kept:
            shape = reused_shard.shape
            contents.add_rows(
                reused_shard.index,
                reused_shard.paths,
                reused_shard.skipped,
                {streamed.output_name: set() if shape is None else {shape}},
            )
        todo = shards[len(kept) :]
    else:
        for shard in shards:
            results = parts.reusable(shard) if resume else None
            if results is None:
                todo.append(shard)
            else:
                contents.add(shard.index, results)
    reused = len(shards) - len(todo)
    # Reused images are where the bar starts, not progress: the rate and the time left are
    # those of the images computed now.
    bar: Any = _NoProgress()  # tqdm's bar has no types of its own
    if progress:
        from tqdm import tqdm  # loaded to draw only: 4 ms of a job's start (with multiprocessing)

        bar = tqdm(
            total=len(items),
            initial=sum(len(shard.items) for shard in shards) - sum(len(s.items) for s in todo),
            unit="img",
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
        )
    rule = None
    if encoded and isinstance(runner, RemoteRunner):
        try:  # which files the server takes as they are: its own limits
            rule = runner.encoded_rule()
        except FeatmapError as exc:  # the server's first answer (a token missing, say)
            raise JobError(str(exc)) from None
    job = Job(
        pipeline,
        runner,
        resize=resize,
        batch_size=batch_size,
        on_error=on_error,
        progress=bar.update,
        decode_threads=default_decode_threads(inputs) if decode_threads is None else decode_threads,
        prefetch=prefetch,
        draft=draft,
        encoded=rule,
    )
    # Finished shards are saved on a thread, one at a time, while the next batches compute
    # (onnxruntime and the file writes release the GIL): at most SAVING shards' results wait.
    # A young job keeps them in memory instead (see HeldShards), so a short job writes only its
    # output.
    saving: collections.deque[Future[None]] = collections.deque()
    held = HeldShards(
        CHECKPOINT_AFTER_S if checkpoint_after_s is None else checkpoint_after_s, HELD_BYTES
    )
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="featmap-save") as saver:
            keep = parts.save if streamed is None else streamed.append

            def save(finished: list[tuple[Shard, Results]]) -> None:
                for shard, results in finished:
                    while len(saving) >= SAVING:
                        saving.popleft().result()
                    saving.append(saver.submit(keep, shard, results))

            try:
                for shard, results in job.run(todo):
                    if streamed is not None:
                        try:  # a .npy's rows share one shape: say so now, not at the end
                            streamed.check(results)
                        except ValueError as exc:
                            raise JobError(str(exc), 2) from None
                    contents.add(shard.index, results)
                    save(held.add(shard, results))
            except BaseException:
                save(held.release())  # a failing or interrupted job keeps every shard it finished
                raise
            finally:
                # Their saves complete first.
                bar.close()
                while saving:
                    saving.popleft().result()
        try:
            if streamed is not None and streamed.used:
                for shard in shards[len(streamed.shards) :]:  # a young job's held shards
                    in_memory = held.get(shard.index)
                    assert in_memory is not None  # saved shards are in the rows file, in order
                    streamed.append(shard, in_memory)
                streamed.finish(output, len(contents.paths))
            else:
                metadata = {**identity, "outputs": pipeline.output_names}
                sources: list[Part] = []
                for shard in shards:
                    in_memory = held.get(shard.index)
                    sources.append(parts.results_file(shard) if in_memory is None else in_memory)
                write_merged(contents, sources, output, metadata)
        except ValueError as exc:
            raise JobError(str(exc), 2) from None
    finally:
        if streamed is not None:
            streamed.close()
    parts.clear()
    return JobReport(
        output=output,
        images=len(contents.paths),
        skipped=contents.skipped,
        shards=len(shards),
        shards_reused=reused,
        images_computed=job.images_computed,
    )


def default_decode_threads(inputs: Sequence[Path]) -> int:
    """Decode threads: one per core, since Pillow decodes with the GIL released; none for
    arrays alone (.npy, .npz, IDX), read as slices of their batches with nothing to decode.
    Measured on 2 cores over a 10,000x1x28x28 .npy, whole process, median of 5: 1.14 s
    without decode threads against 1.22 s with them."""
    return 0 if arrays_only(inputs) else os.cpu_count() or 1


def int8_cache_dir(args: Any) -> Path | None:
    """Where an embedded int8 job keeps quantized models: --cache-dir, else the user's cache
    folder; None with --no-cache or --cache-dir none."""
    from ..service.int8.cache import NO_CACHE, default_cache_dir

    if args.no_cache:
        return None
    if args.cache_dir is None:
        return default_cache_dir()
    return None if args.cache_dir.strip().lower() == NO_CACHE else Path(args.cache_dir)


def describe_int8_source(source: str, seconds: float, cache_dir: Path | None) -> str:
    """The job's line on where its int8 model came from and what that cost."""
    if source == "disk cache":
        return f"int8 model read from the cache in {cache_dir} in {seconds:.2f} s: not quantized"
    kept = f"; kept in {cache_dir}" if cache_dir is not None else " (no cache: --no-cache)"
    return f"int8 calibrated, quantized and measured in {seconds:.2f} s{kept}"


def command(args: Any, pipeline: Pipeline, resize: tuple[int, int] | None) -> int:
    """`featmap extract` after argument parsing; JobError(exit_code=2) is a usage error."""
    # The spec-file reader lives with the server that shares it; it loads no onnx.
    from ..service.specfiles import SpecFileError, load_weight_tensors

    progress = not args.quiet and (args.progress or sys.stderr.isatty())
    try:
        tensors = {} if args.weights is None else load_weight_tensors(args.weights)
    except SpecFileError as exc:
        raise JobError(str(exc), exit_code=2) from None

    def notice(line: str) -> None:
        print(f"featmap extract: {line}", file=sys.stderr)

    runner: EmbeddedRunner | RemoteRunner
    # Arrays alone (.npy, .npz, IDX) leave the cores to onnxruntime (no decode threads: see
    # default_decode_threads), whose pool threads may then spin between runs, its default.
    # Measured on 2 cores over a 10,000x1x28x28 .npy, whole process, median of 6: spinning
    # off 1.39 s against on 1.29 s.
    arrays = arrays_only(Path(path) for path in args.input)
    if args.name and not args.server:
        raise JobError("--name registers the pipeline on servers: it needs --server", 2)
    if args.shared_memory and not args.server:
        raise JobError("--shared-memory is a way to reach a server: it needs --server", 2)
    if args.request_images is not None and args.request_images < 1:
        raise JobError(f"--request-images must be >= 1, not {args.request_images}", 2)
    try:
        calibration = job_calibration(pipeline, args.input, args.calibrate, resize)
    except ValueError as exc:  # --calibrate without int8, or an --input that is not there
        raise JobError(str(exc), exit_code=2) from None
    if calibration is not None and not args.quiet:
        notice(f"calibrating int8 on {calibration.describe()}")
    images = None if calibration is None else calibration.images
    try:
        if args.server:
            # The client is loaded by the jobs that use it: an embedded job loads no gRPC.
            from ..client.client import FeatmapRpcError
            from .arguments import security_from_arguments

            try:
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
                    args.request_images,
                    args.shared_memory,
                )
            except FeatmapRpcError as exc:  # registering the weights failed on a server
                notice(f"error: {exc}")
                return 1
            except ValueError as exc:  # --shared-memory where the server offers none
                raise JobError(str(exc), exit_code=2) from None
        else:
            cache_dir = int8_cache_dir(args) if pipeline.precision == "int8" else None
            runner = EmbeddedRunner(
                pipeline, args.threads, tensors, images, cache_dir, spinning=arrays
            )
            if runner.int8_source is not None and not args.quiet:
                notice(describe_int8_source(runner.int8_source, runner.int8_seconds, cache_dir))
    except FeatmapError as exc:  # the spec, its weights or the limits, checked here
        raise JobError(str(exc), exit_code=2) from None
    if runner.report is not None and not args.quiet:
        notice(runner.report.describe())
    output = Path(args.output)
    parts = output.with_name(output.name + ".parts")

    resume_collections()  # everything the job needs is loaded (featmap.jobs.startup)
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
            checkpoint_after_s=args.checkpoint_after,
            encoded=bool(args.server) and not args.decode_locally,
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
