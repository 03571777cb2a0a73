"""The `featmap` command: `serve` starts the server, `schema` prints the spec's JSON Schema."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

from .arguments import add_connection_arguments
from .startup import pause_collections, resume_collections


class UsageError(Exception):
    """A command cannot run as asked; printed without a traceback, exit status 2."""


class VersionAction(argparse.Action):
    """--version: featmap's version (the distribution's, as the server reports it)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from ..contract import __version__

        print(f"featmap {__version__}")
        parser.exit()


# `featmap serve` flag -> the ServerSettings field it sets.
SERVE_FLAGS = {
    "--host": "host",
    "--port": "port",
    "--providers": "providers",
    "--threads": "intra_op_threads",
    "--workers": "grpc_workers",
    "--cache-size": "session_cache_size",
    "--max-message-bytes": "max_message_bytes",
    "--log-level": "log_level",
    "--log-format": "log_format",
    "--metrics-port": "metrics_port",
    "--pipelines": "pipelines_dir",
    "--pipeline-store": "pipeline_store",
}


class ServeHelpAction(argparse.Action):
    """`featmap serve --help`, with each flag's default read from ServerSettings itself.

    The settings are imported only here, so that `featmap --help` and every other command stay
    free of the server's modules.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        require_extra("server")
        from ..service.settings import ServerSettings, default_grpc_workers

        fields = ServerSettings.model_fields
        for action in parser._actions:
            name = next((SERVE_FLAGS[o] for o in action.option_strings if o in SERVE_FLAGS), None)
            if name is None:
                continue
            if name == "grpc_workers":
                default: Any = f"max(64, 8 x cores) = {default_grpc_workers()} here"
            elif name == "providers":
                default = "CUDA if onnxruntime has it, then CPU"
            else:
                default = fields[name].get_default(call_default_factory=True)
            action.help = f"{action.help} (default: {default})"
        parser.print_help()
        parser.exit()


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ..service.server import serve
    from ..service.settings import ServerSettings

    overrides = {
        key: value
        for key, value in {
            "host": args.host,
            "port": args.port,
            "providers": args.providers,
            "intra_op_threads": args.threads,
            "grpc_workers": args.workers,
            "session_cache_size": args.cache_size,
            "max_message_bytes": args.max_message_bytes,
            "reflection": args.reflection,
            "log_level": args.log_level,
            "log_format": args.log_format,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "tls_client_ca": args.tls_client_ca,
            "auth_tokens_file": args.auth_tokens_file,
            "metrics_port": args.metrics_port,
            "unix_socket": args.unix_socket,
            "shared_memory": args.shared_memory,
            "pipelines_dir": args.pipelines,
            "skip_invalid_pipelines": args.skip_invalid,
            "pipeline_store": args.pipeline_store,
        }.items()
        if value is not None
    }
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"invalid settings: {problems}") from None
    from ..service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    try:
        serve(settings)
    except (OSError, ValueError) as exc:  # port taken, provider missing
        raise UsageError(str(exc)) from None
    return 0


def _schema(args: argparse.Namespace) -> int:
    from ..contract.spec import json_schema_text

    sys.stdout.write(json_schema_text())  # the text of proto/featmap/v1/pipeline.schema.json
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import default_threads, run_bench

    only_job = args.job is not None
    counts = args.rss_images.split(",") if args.rss_images else []
    if counts and (len(counts) != 2 or not all(n.strip().isdigit() for n in counts)):
        raise UsageError(f"--rss-images expects two counts, e.g. 1000,20000: {args.rss_images}")
    rss = [int(n) for n in counts]
    report = run_bench(
        threads=args.threads or default_threads(),
        batch=args.batch,
        size=args.size,
        seconds=args.seconds,
        clients=args.clients,
        rounds=args.rounds,
        service=not only_job,
        job_folder=Path(args.job) if args.job else None,
        job_images=args.job_images,
        array_images=args.array_images,
        rss_images=(rss[0], rss[1]) if rss else None,
        int8=not (only_job or args.no_int8),
        ray=args.ray,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(report.table())
    return 0


def _load_pipeline(path: str) -> Any:
    from ..contract.errors import InvalidSpec
    from ..service.specfiles import SpecFileError, load_pipeline_file

    try:
        return load_pipeline_file(path)
    except (SpecFileError, InvalidSpec) as exc:
        raise UsageError(str(exc)) from None


def _load_weights(path: str | None) -> dict[str, Any]:
    from ..service.specfiles import SpecFileError, load_weight_tensors

    try:
        return {} if path is None else load_weight_tensors(path)
    except SpecFileError as exc:
        raise UsageError(str(exc)) from None


def _summary(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..contract.errors import FeatmapError, InvalidSpec
    from ..contract.limits import DEFAULT_LIMITS
    from .calibration import load_calibration
    from .summary import format_summary, measure_int8, parse_input_size

    pipeline = _load_pipeline(args.pipeline)
    if pipeline.precision != "int8" and args.calibrate:
        raise UsageError("--calibrate measures int8 pipelines; this one is float32")
    try:
        size = None if args.input_size is None else parse_input_size(args.input_size)
        sys.stdout.write(format_summary(pipeline, size))
    except ValueError as exc:
        raise UsageError(f"--input-size: {exc}") from None
    except InvalidSpec as exc:  # the image is too small for some layer
        raise UsageError(str(exc)) from None
    if pipeline.precision != "int8":
        return 0
    try:
        # Image files take --input-size as their size, as --resize in featmap extract.
        calibration = load_calibration(
            [Path(p) for p in args.calibrate or []],
            pipeline.input,
            DEFAULT_LIMITS.max_calibration_images,
            size,
        )
        images = calibration.values(pipeline.input)
        table = measure_int8(pipeline, _load_weights(args.weights), images)
    except (ValueError, FeatmapError) as exc:
        raise UsageError(str(exc)) from None
    sys.stdout.write("\n" + table)
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from ..contract.errors import FeatmapError
    from .export_onnx import export_onnx

    pipeline = _load_pipeline(args.pipeline)
    tensors = _load_weights(args.weights)
    try:
        export_onnx(
            pipeline,
            args.output,
            tensors,
            standard_ops=args.standard_ops,
            weight_bits=None if args.int8_weights == "this-cpu" else int(args.int8_weights),  # type: ignore[arg-type]
        )
    except FeatmapError as exc:  # e.g. weights named as tensors that only RegisterPipeline has
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    print(f"wrote {args.output} (pipeline {pipeline.pipeline_id})", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace) -> int:
    from .onnx_import import OnnxImportError, import_onnx, write_imported

    try:
        imported = import_onnx(args.model, until=args.until)
    except OnnxImportError as exc:
        raise UsageError(str(exc)) from None
    except (OSError, ValueError) as exc:  # not a readable ONNX file
        raise UsageError(f"cannot read {args.model}: {exc}") from None
    try:
        npz = write_imported(imported, args.output)
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    print(npz)
    return 0


def _visualize(args: argparse.Namespace) -> int:
    from ..contract.errors import FeatmapError
    from .visualize import VisualizeError, visualize

    pipeline = _load_pipeline(args.pipeline)
    tensors = _load_weights(args.weights)
    try:
        chosen = visualize(
            pipeline, args.image, args.output, args.layer, args.columns, args.scale, tensors
        )
    except (VisualizeError, FeatmapError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    print(f"wrote {args.output}: {chosen.name} {chosen.shape}", file=sys.stderr)
    return 0


def _health(args: argparse.Namespace) -> int:
    from .arguments import security_from_arguments
    from .health import SERVING_EXIT, check_health

    result = check_health(
        args.server, args.service, args.timeout, security_from_arguments(args), wait=args.wait
    )
    print(result.message, file=sys.stdout if result.exit_code == SERVING_EXIT else sys.stderr)
    return result.exit_code


EXTRACT_EPILOG = """\
inputs:
  image files (PNG, JPEG, WebP, BMP, TIFF) are converted to the pipeline's channels (1: L, 3: RGB,
  4: RGBA). uint8 pipelines get the raw 0..255 pixels; float pipelines get pixel/255 in
  their dtype, unless input.scale is set: then the raw 0..255 values (the graph scales).
  .npy files hold one image or a batch (N, ...), .npz files one image (one array), in the
  pipeline's layout and dtype, taken as they are (--resize is for image files only).
  IDX files (*-idx3-ubyte, *.idx, gzipped or not: MNIST's format) hold a batch of ubyte
  images, (N, H, W) or (N, ...) in the pipeline's layout, taken as pixels as image files
  are; a batch's rows are named file[i]. Batch files are read a batch of rows at a time.
  Without --resize, images of different sizes run in batches of one size each.
  Image files travel as uint8 pixels (a quarter of float32's bytes): the pipeline's pixel
  variant takes them and divides by 255 in the graph (featmap.contract.pixels). With
  --server, JPEG, PNG and WebP files go as they are and the server decodes them by the same
  rule (--decode-locally: decode here, send pixels); the features are the same.

outputs (by extension):
  .npz      paths, outputs, one (N, ...) array per output -- or <name>__<i> per image when
            sizes differ -- plus skipped and skipped_errors; np.load(allow_pickle=False)
  .npy      the single output as one (N, ...) array (single-output pipelines only)
  .parquet  a path column and one list<float32> column per output (needs pyarrow)

exit status: 0 done, 1 failed, 2 usage or invalid pipeline, 3 done but inputs were skipped,
130 interrupted (the finished shards are kept for --resume)
"""


def _extract(args: argparse.Namespace) -> int:
    from .extract import command
    from .images import parse_size
    from .job import JobError

    pipeline = _load_pipeline(args.pipeline)
    if args.precision is not None:
        pipeline = pipeline.with_precision(args.precision)
    try:
        resize = None if args.resize is None else parse_size(args.resize)
        return command(args, pipeline, resize)
    except (JobError, ValueError) as exc:  # JobError here is always a usage error (exit 2)
        raise UsageError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `featmap` command."""
    parser = argparse.ArgumentParser(prog="featmap", description=__doc__)
    parser.add_argument("--version", action=VersionAction, help="print featmap's version and exit")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the gRPC server (settings also from FEATMAP_*)",
        description="Run the gRPC server. Every flag is also a FEATMAP_<SETTING> variable; "
        "flags win. Defaults shown are the settings' own.",
        add_help=False,
    )
    serve.add_argument("-h", "--help", action=ServeHelpAction, help="show this help and exit")
    serve.add_argument("--host", help="address to bind")
    serve.add_argument("--port", type=int, help="port to bind; 0 picks a free one")
    serve.add_argument(
        "--providers",
        type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
        help="comma-separated onnxruntime execution providers, in priority order",
    )
    serve.add_argument(
        "--threads", type=int, help="onnxruntime intra-op threads (0: one per physical core)"
    )
    serve.add_argument("--workers", type=int, help="gRPC handler threads")
    serve.add_argument("--cache-size", type=int, help="compiled sessions kept (LRU)")
    serve.add_argument("--max-message-bytes", type=int, help="largest gRPC message")
    serve.add_argument(
        "--reflection", action="store_true", default=None, help="enable gRPC server reflection"
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    serve.add_argument(
        "--log-format", choices=["text", "json"], help="text, or one JSON object per line"
    )
    serve.add_argument("--tls-cert", help="server certificate chain (PEM); enables TLS")
    serve.add_argument("--tls-key", help="server private key (PEM)")
    serve.add_argument(
        "--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)"
    )
    serve.add_argument(
        "--auth-tokens-file",
        help="require `authorization: Bearer <token>` naming a token of this file, one a line "
        "(tokens also from FEATMAP_AUTH_TOKENS, comma-separated)",
    )
    serve.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (0: a free one)"
    )
    serve.add_argument(
        "--unix-socket",
        help="also serve on this Unix domain socket (mode 0600: the server's user only)",
    )
    serve.add_argument(
        "--shared-memory",
        action="store_true",
        default=None,
        help="offer shared memory to callers on --unix-socket (off by default)",
    )
    serve.add_argument(
        "--pipelines",
        metavar="DIR",
        help="register every spec file of DIR (.yaml/.yml/.json, weights from <name>.npz) "
        "under its file name before serving; DIR/<tenant>/ holds a tenant's",
    )
    serve.add_argument(
        "--skip-invalid",
        action="store_true",
        default=None,
        help="with --pipelines: log a file that cannot be registered and go on, instead of "
        "refusing to start (exit status 2)",
    )
    serve.add_argument(
        "--pipeline-store",
        metavar="DIR_OR_URL",
        help="keep registered pipelines here, shared by replicas: a directory or an fsspec URL "
        "(s3://, gs://); none: in memory only",
    )
    serve.set_defaults(run=_serve)

    bench = commands.add_parser(
        "bench",
        help="throughput and latency as ratios against onnxruntime in-process; the batch job",
        description="Every path of the service and of `featmap extract`, as images/s and ratios "
        "against onnxruntime in this process, then the goals table. --job runs the batch job's "
        "section alone.",
    )
    bench.add_argument("--threads", type=int, help="intra-op threads, both sides (default: cores)")
    bench.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    bench.add_argument("--size", type=int, default=224, help="image height and width (224)")
    bench.add_argument("--seconds", type=float, default=5.0, help="time per measurement (5)")
    bench.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    bench.add_argument("--rounds", type=int, default=3, help="alternating rounds per ratio (3)")
    bench.add_argument(
        "--job",
        nargs="?",
        const="",
        metavar="FOLDER",
        help="only the batch job: over FOLDER's images (resized to --size), or generated JPEGs",
    )
    bench.add_argument(
        "--job-images", type=int, default=1536, help="generated JPEGs for the job (1536)"
    )
    bench.add_argument(
        "--array-images",
        type=int,
        default=10_000,
        help="rows of the array job's 1x28x28 uint8 .npy (10000; 0 leaves it out)",
    )
    bench.add_argument(
        "--rss-images",
        default="1000,20000",
        help="peak RSS of the job for these two counts of 64x64 JPEGs ('' to skip; 1000,20000)",
    )
    bench.add_argument(
        "--no-int8",
        action="store_true",
        help="leave out the int8 rows (int8 vs float32: in-process, unary, stream, a job)",
    )
    bench.add_argument(
        "--ray",
        action="store_true",
        help="add the Ray Data row: the README's Ray example against featmap extract over the "
        "job's --job-images JPEGs on a local Ray, whole process, with peak memory (minutes)",
    )
    bench.set_defaults(run=_bench)

    schema = commands.add_parser("schema", help="print the pipeline spec's JSON Schema")
    schema.set_defaults(run=_schema)

    summary = commands.add_parser(
        "summary", help="per-layer output shapes, parameters and FLOPs of a pipeline file"
    )
    summary.add_argument("--pipeline", required=True, help="spec file (.yaml, .yml or .json)")
    summary.add_argument("--input-size", help="image HxW for concrete shapes and FLOPs")
    summary.add_argument(
        "--calibrate",
        nargs="+",
        metavar="PATH",
        help="int8: measure the error on these images (folders or files, the first 256 of one "
        "size; resized to --input-size if given) instead of 16 synthetic ones",
    )
    summary.add_argument(
        "--weights", help='int8: .npz of the tensors the spec names as {"tensor": NAME}'
    )
    summary.set_defaults(run=_summary)

    export = commands.add_parser("export-onnx", help="write a pipeline's ONNX model to a file")
    export.add_argument("--pipeline", required=True, help="spec file (.yaml, .yml or .json)")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--weights", help='.npz of the tensors the spec names as {"tensor": NAME}')
    export.add_argument(
        "--standard-ops",
        action="store_true",
        help="int8: standard ONNX ops only (QDQ), for runtimes other than onnxruntime; "
        "the same numbers on onnxruntime, a little slower",
    )
    export.add_argument(
        "--int8-weights",
        choices=["7", "8", "this-cpu"],
        default="7",
        help="int8: 7-bit weights (default) are exact on every CPU; 8-bit ones only on CPUs "
        "with int8 dot products (VNNI, AMX, ARM dotprod), elsewhere they saturate; this-cpu: "
        "what a server on this machine runs",
    )
    export.set_defaults(run=_export_onnx)

    importer = commands.add_parser(
        "import",
        help="convert an ONNX conv stack to a pipeline spec (YAML) and its weights (.npz "
        "beside it, whose path it prints)",
    )
    importer.add_argument("model", help="the .onnx file")
    importer.add_argument(
        "-o", "--output", required=True, help="the spec file to write (.yaml); weights: .npz"
    )
    importer.add_argument(
        "--until", metavar="NODE_OR_OUTPUT", help="end at this node or tensor (cut the graph)"
    )
    importer.set_defaults(run=_import)

    visualize = commands.add_parser(
        "visualize", help="draw one layer's feature maps for one image as a PNG grid"
    )
    visualize.add_argument("--pipeline", required=True, help="spec file (.yaml, .yml or .json)")
    visualize.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    visualize.add_argument("--layer", help="layer name (default: the last with H x W > 1)")
    visualize.add_argument("-o", "--output", required=True, help="the PNG to write")
    visualize.add_argument("--columns", type=int, help="tiles per row (default: near-square)")
    visualize.add_argument("--scale", type=int, help="enlarge each map by this integer factor")
    visualize.add_argument(
        "--weights", help='.npz of the tensors the spec names as {"tensor": NAME}'
    )
    visualize.set_defaults(run=_visualize)

    health = commands.add_parser(
        "health", help="grpc.health.v1 check: exit 0 SERVING, 1 not serving, 2 unreachable"
    )
    health.add_argument("--server", required=True, help="address, e.g. 127.0.0.1:50051")
    add_connection_arguments(health)
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    health.add_argument("--service", default="", help="service name (default: the server)")
    health.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="keep asking for up to S seconds until SERVING (for a server that is starting)",
    )
    health.set_defaults(run=_health)

    extract = commands.add_parser(
        "extract",
        help="run a pipeline over images or arrays into .npz/.npy/.parquet (batch job)",
        description="Run a pipeline over a folder (recursive) or files of images or arrays, "
        "in-process, or on --server(s), into one output file.",
        epilog=EXTRACT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    extract.add_argument("--pipeline", required=True, help="pipeline spec, .yaml/.yml or .json")
    extract.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="folders (searched recursively) or files: images, .npy/.npz, IDX",
    )
    extract.add_argument("--output", required=True, help="the .npz, .npy or .parquet to write")
    extract.add_argument(
        "--server",
        action="append",
        help="server address; repeat for round robin over IP addresses, or one dns:///name:port "
        "(default: run in this process)",
    )
    extract.add_argument(
        "--in-flight", type=int, default=4, help="requests in flight with --server (4)"
    )
    extract.add_argument(
        "--request-images",
        type=int,
        metavar="N",
        help="with --server, at most N images a request (batches are joined, never split); "
        "default: small images' batches are joined up to about 2 GFLOPs a request",
    )
    extract.add_argument(
        "--name",
        help="with --server: register the pipeline under this name on every server (OIP "
        "clients and others can then use the name); a name of another pipeline is an error",
    )
    extract.add_argument(
        "--replace-name",
        action="store_true",
        help="with --name: move the name to this pipeline if it names another one",
    )
    extract.add_argument(
        "--shared-memory",
        action="store_true",
        help="with --server unix:PATH of a server started with --shared-memory: images and "
        "features go through /dev/shm instead of the socket (README: shared memory)",
    )
    extract.add_argument("--timeout", type=float, default=300.0, help="seconds per request (300)")
    add_connection_arguments(extract)
    extract.add_argument("--threads", type=int, default=0, help="onnxruntime threads in-process")
    extract.add_argument(
        "--weights",
        help='.npz of the tensors the spec names as {"tensor": NAME} (registered on the servers '
        "with --server)",
    )
    extract.add_argument(
        "--precision",
        choices=["float32", "int8"],
        help="compute in this precision, whatever the spec says (int8: quantized, CPU only; "
        "README: int8 precision)",
    )
    extract.add_argument(
        "--calibrate",
        type=int,
        metavar="N",
        help="int8: calibrate on the first N inputs, decoded as the job decodes them (default "
        "16; 0: on 16 synthetic images only); the measured error is printed, and a pipeline "
        "over the spec's max_error is refused",
    )
    extract.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="int8: keep quantized models (with their measured error) in DIR, by content id, "
        "so that a repeat job quantizes nothing (default: $FEATMAP_CACHE_DIR, else "
        "$XDG_CACHE_HOME/featmap, else ~/.cache/featmap; 'none': off)",
    )
    extract.add_argument(
        "--no-cache", action="store_true", help="int8: quantize anew, keep nothing on disk"
    )
    extract.add_argument("--resize", metavar="HxW", help="resize images (bilinear) to HxW")
    extract.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="with --resize: decode JPEGs at 1/2, 1/4 or 1/8 scale (at least HxW) first; "
        "several times faster for large photos, pixels differ slightly from a full decode",
    )
    extract.add_argument(
        "--decode-locally",
        action="store_true",
        help="with --server: decode image files here and send pixels, instead of sending "
        "JPEG, PNG and WebP files as they are for the server to decode (the features are the "
        "same; the files are about 10x fewer bytes on the wire)",
    )
    extract.add_argument(
        "--decode-threads",
        type=int,
        help="threads decoding images ahead of the pipeline (default: one per core, none "
        "when every --input is a .npy/.npz/IDX file; 0: none)",
    )
    extract.add_argument("--batch-size", type=int, default=32, help="images per batch (32)")
    extract.add_argument(
        "--shard-size", type=int, default=256, help="images per resumable shard (256)"
    )
    extract.add_argument(
        "--resume", action="store_true", help="reuse finished shards of an interrupted run"
    )
    extract.add_argument(
        "--checkpoint-after",
        type=float,
        metavar="SECONDS",
        # The default is parts.CHECKPOINT_AFTER_S (not imported here: the command starts
        # faster without Pillow); tests/test_extract_edges.py checks this help names it.
        help="save finished shards for --resume once the job is this old; before, they wait "
        "in memory, and a hard kill loses them (an error or Ctrl-C saves them) "
        "(default 10; 0: save each as it finishes)",
    )
    extract.add_argument(
        "--on-error",
        choices=["skip", "fail"],
        default="fail",
        help="an unreadable input: stop (fail, exit 1) or skip, list it and exit 3 (fail)",
    )
    extract.add_argument(
        "--progress", action="store_true", help="progress bar even if stderr is no terminal"
    )
    extract.add_argument("--quiet", action="store_true", help="no progress bar nor summary")
    extract.set_defaults(run=_extract)
    return parser


# What the extras add, by import name (pyproject.toml's `cli` and `server` extras;
# tests/test_install.py keeps them alike). `pip install featmap` alone is the client library:
# every command needs `cli`; those that compile or run pipelines here need `server`, which
# brings `cli` too.
CLI_MODULES = frozenset({"pydantic", "PIL", "yaml", "tqdm"})
SERVER_MODULES = frozenset(
    {"onnx", "onnxruntime", "grpc_reflection", "pydantic_settings", "prometheus_client"}
)
EXTRA_MODULES = {"cli": CLI_MODULES, "server": CLI_MODULES | SERVER_MODULES}
# The commands that always run pipelines here (so do `extract` without --server and an int8
# `summary`, which the modules they import find out).
SERVER_COMMANDS = frozenset({"serve", "bench", "export-onnx", "import", "visualize"})
MISSING = {"cli": "needs the command line's modules", "server": "runs the server side"}


class MissingExtra(Exception):
    """A command needs an extra this install lacks: one line, exit status 2."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"featmap: error: this command {MISSING[extra]}, which this install lacks (no "
            f'module {module!r}): pip install "featmap[{extra}]"\n'
        )


def installed(module: str) -> bool:
    """Whether `module` can be imported here, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_extra(extra: str) -> None:
    """MissingExtra, naming `extra`, when a module it brings is not installed."""
    missing = sorted(m for m in EXTRA_MODULES[extra] if not installed(m))
    if missing:
        raise MissingExtra(missing[0], extra)


def command_extra(args: argparse.Namespace) -> str:
    """The extra a command needs: `server` where it runs pipelines here, `cli` otherwise."""
    embedded = args.command == "extract" and args.server is None
    return "server" if args.command in SERVER_COMMANDS or embedded else "cli"


def extra_missing(exc: ModuleNotFoundError) -> MissingExtra | None:
    """MissingExtra for an import that failed on a module of an extra, else None."""
    module = (exc.name or "").split(".")[0]
    extra = next((e for e in ("cli", "server") if module in EXTRA_MODULES[e]), None)
    return None if extra is None else MissingExtra(module, extra)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `featmap` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # `serve --help` reads the server's settings
        if args.command != "extract":
            resume_collections()
        require_extra(command_extra(args))
        return int(args.run(args))
    except UsageError as exc:
        parser.exit(2, f"featmap {args.command}: error: {exc}\n")
    except MissingExtra as exc:
        parser.exit(2, str(exc))
    except BrokenPipeError:  # `featmap schema | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    except ModuleNotFoundError as exc:  # an int8 summary, or a module the checks above missed
        missing = extra_missing(exc)
        if missing is None:
            raise
        parser.exit(2, str(missing))


def console(argv: Sequence[str] | None = None) -> int:
    """The `featmap` console script: main(argv), after which the process ends."""
    pause_collections()  # until the job runs, for `featmap extract` (see featmap.jobs.startup)
    code = main(argv)
    # Its last collections would walk every object of pydantic, onnx and numpy for nothing.
    # Measured on an embedded job over a 10,000-row .npy: 0.071 s from main's return to the
    # process's end, 0.024 s with them frozen (median of 12).
    gc.freeze()
    return code


if __name__ == "__main__":
    raise SystemExit(console())
