"""int8's measured error with 7-bit and 8-bit weights on this CPU, and a digest of the outputs.

    python scripts/int8_weights.py                 # the bench's standard pipeline, 64 x 64
    python scripts/int8_weights.py --size 224
    # onnxruntime's AVX2 kernels on any x86 machine (apt-get install qemu-user; slow):
    FEATMAP_INT8_CPU=none qemu-x86_64 -cpu EPYC-Milan .venv/bin/python scripts/int8_weights.py

Both models are quantized on the same images, so the digests of 7-bit outputs agree between
CPUs with and without int8 dot products (the integers are exact on both), and those of 8-bit
outputs differ where AVX2's int16 pair sums saturate.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib

import onnxruntime as ort

from featmap.contract.spec import parse_pipeline
from featmap.jobs.bench import standard_spec
from featmap.service.graph import compile_pipeline
from featmap.service.int8 import (
    DEFAULT_SETTINGS,
    cpu_int8_support,
    quantize_with_report,
    run_model,
    synthetic_calibration,
    weight_bits_for,
)


def main() -> None:
    """Print one line per weight width."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--images", type=int, default=8, help="calibration images")
    args = parser.parse_args()
    cpu = cpu_int8_support()
    print(
        f"CPU int8: {cpu} (chosen: {weight_bits_for(cpu)}-bit weights), "
        f"onnxruntime {ort.__version__}, standard pipeline at {args.size}x{args.size}"
    )
    pipeline = parse_pipeline(standard_spec())
    model = compile_pipeline(pipeline)
    images = synthetic_calibration(model, count=args.images, size=(args.size, args.size))
    for bits in (8, 7):
        settings = dataclasses.replace(DEFAULT_SETTINGS, weight_bits=bits)
        quantized = quantize_with_report(model, images, settings=settings)
        outputs = run_model(quantized.model, images)
        digest = hashlib.sha256(b"".join(outputs[n].tobytes() for n in sorted(outputs)))
        print(
            f"{bits}-bit weights: max error {quantized.report.max_error:.2%}, "
            f"min cosine {quantized.report.min_cosine:.6f}, outputs sha256 "
            f"{digest.hexdigest()[:16]}"
        )


if __name__ == "__main__":
    main()
