"""The `featmap` command: `serve` starts the server, `schema` prints the spec's JSON Schema."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


class UsageError(Exception):
    """A command cannot run as asked; printed without a traceback, exit status 2."""


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from featmap.service.server import serve
    from featmap.service.settings import ServerSettings

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
        }.items()
        if value is not None
    }
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"invalid settings: {problems}") from None
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        serve(settings)
    except (OSError, ValueError) as exc:  # port taken, provider missing
        raise UsageError(str(exc)) from None
    return 0


def _schema(args: argparse.Namespace) -> int:
    from featmap.service.spec import json_schema

    json.dump(json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from featmap.client.bench import default_threads, run_bench

    report = run_bench(
        threads=args.threads or default_threads(),
        batch=args.batch,
        size=args.size,
        seconds=args.seconds,
        clients=args.clients,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(report.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `featmap` command."""
    parser = argparse.ArgumentParser(prog="featmap", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server (settings also from FEATMAP_*)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind; 0 picks a free one (default 50051)")
    serve.add_argument(
        "--providers",
        type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
        help="comma-separated onnxruntime execution providers (default: CUDA if present, CPU)",
    )
    serve.add_argument("--threads", type=int, help="onnxruntime intra-op threads (0: auto)")
    serve.add_argument("--workers", type=int, help="gRPC handler threads")
    serve.add_argument("--cache-size", type=int, help="compiled sessions kept (LRU)")
    serve.add_argument("--max-message-bytes", type=int, help="largest gRPC message")
    serve.add_argument(
        "--reflection", action="store_true", default=None, help="enable gRPC server reflection"
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    serve.set_defaults(run=_serve)

    bench = commands.add_parser(
        "bench", help="throughput and latency as ratios against onnxruntime in-process"
    )
    bench.add_argument("--threads", type=int, help="intra-op threads, both sides (default: cores)")
    bench.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    bench.add_argument("--size", type=int, default=224, help="image height and width (224)")
    bench.add_argument("--seconds", type=float, default=5.0, help="time per measurement (5)")
    bench.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    bench.set_defaults(run=_bench)

    schema = commands.add_parser("schema", help="print the pipeline spec's JSON Schema")
    schema.set_defaults(run=_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `featmap` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except UsageError as exc:
        parser.exit(2, f"featmap {args.command}: error: {exc}\n")
    except BrokenPipeError:  # `featmap schema | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
