"""int8 against float32 in this process, for the standard bench pipeline, variant by variant.

    python scripts/int8_speed.py                    # every variant, 2 threads, 32 x 3 x 224 x 224
    python scripts/int8_speed.py --variants chosen  # just the chosen settings
    python scripts/int8_speed.py --calibration      # error on photo-like images by calibration set

Each variant is timed against float32 call by call in turn (float32, variant, float32, ...),
so that both see the same load from other processes on a shared machine, in rounds of
--seconds; the table shows medians over the rounds: of img/s, and of each round's ratio
(float32's time / the variant's). The CPU column is that ratio in CPU-seconds of this process,
which other processes disturb less (but it counts spinning threads' idle spins as work).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from PIL import Image, ImageDraw, ImageFilter

from featmap.contract.spec import parse_pipeline
from featmap.jobs.bench import standard_spec
from featmap.service.graph import INPUT_NAME, compile_pipeline
from featmap.service.int8 import (
    DEFAULT_SETTINGS,
    Int8Settings,
    cpu_int8_support,
    measure_error,
    quantize_with_report,
    run_model,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to quantize and run: quantization settings and session options."""

    settings: Int8Settings | None  # None: the float32 model itself
    spinning: bool = False
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL


VARIANTS: dict[str, Variant] = {
    "chosen": Variant(DEFAULT_SETTINGS),
    "no pooled-conv blocks": Variant(
        dataclasses.replace(DEFAULT_SETTINGS, pooled_conv_blocks=False)
    ),
    "no channel alignment (plain ORT)": Variant(
        dataclasses.replace(DEFAULT_SETTINGS, align_channels=False, pooled_conv_blocks=False)
    ),
    "first conv float": Variant(
        dataclasses.replace(
            DEFAULT_SETTINGS,
            align_channels=False,
            pooled_conv_blocks=False,
            keep_float=("conv2d_0",),
        )
    ),
    "int8 activations": Variant(dataclasses.replace(DEFAULT_SETTINGS, activation_type="int8")),
    "int8 symmetric activations": Variant(
        dataclasses.replace(DEFAULT_SETTINGS, activation_type="int8", symmetric_activations=True)
    ),
    # The chosen weights follow the CPU (8-bit with int8 dot products, else 7-bit): both here.
    "7-bit weights": Variant(dataclasses.replace(DEFAULT_SETTINGS, weight_bits=7)),
    "8-bit weights": Variant(dataclasses.replace(DEFAULT_SETTINGS, weight_bits=8)),
    "per-tensor weights": Variant(dataclasses.replace(DEFAULT_SETTINGS, per_channel=False)),
    "QOperator format": Variant(dataclasses.replace(DEFAULT_SETTINGS, quant_format="qoperator")),
    "chosen, spinning threads": Variant(DEFAULT_SETTINGS, spinning=True),
    "float32, spinning threads": Variant(None, spinning=True),
    "chosen, optimization EXTENDED": Variant(
        DEFAULT_SETTINGS, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ),
}


def session(model: onnx.ModelProto, threads: int, variant: Variant) -> ort.InferenceSession:
    """A CPU session as the server builds one: fixed intra-op threads, one inter-op thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = variant.level
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if variant.spinning else "0"
    )
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def runner(session: ort.InferenceSession, images: np.ndarray) -> Callable[[], object]:
    """A call that runs `session` on `images`."""
    return lambda: session.run(None, {INPUT_NAME: images})


@dataclasses.dataclass
class Pairing:
    """Seconds and CPU-seconds of float32 and of a variant, run call by call in turn."""

    float_wall: float = 0.0
    float_cpu: float = 0.0
    variant_wall: float = 0.0
    variant_cpu: float = 0.0
    calls: int = 0


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(seconds, CPU-seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def paired(
    float_run: Callable[[], object], variant_run: Callable[[], object], seconds: float
) -> Pairing:
    """Alternate single calls of both for about `seconds`: they see the same machine load."""
    float_run()
    variant_run()
    pairing, start = Pairing(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        wall, cpu = timed(float_run)
        pairing.float_wall += wall
        pairing.float_cpu += cpu
        wall, cpu = timed(variant_run)
        pairing.variant_wall += wall
        pairing.variant_cpu += cpu
        pairing.calls += 1
    return pairing


def photo_like(count: int, size: int, seed: int) -> np.ndarray:
    """(count, 3, size, size) float32 in [0, 1]: drawn scenes with soft edges and texture.

    Not 1/f noise (synthetic_calibration's recipe), so calibrating on one and measuring on
    the other is a fair test: a sky-like gradient, overlapping coloured shapes, blur, grain,
    and the README's three example images scaled up.
    """
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        examples = sorted((EXAMPLES / "images").glob("*.png"))
        if index < len(examples) and seed == 0:
            picture = Image.open(examples[index]).convert("RGB").resize((size, size))
        else:
            top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            ramp = np.linspace(0, 1, size)[:, None, None]
            sky = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
            picture = Image.fromarray(np.broadcast_to(sky, (size, size, 3)).copy())
            draw = ImageDraw.Draw(picture)
            for _ in range(int(rng.integers(5, 25))):
                x0, y0 = rng.integers(-size // 4, size, 2)
                w, h = rng.integers(size // 16, size // 2, 2)
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
                shape = rng.integers(0, 3)
                if shape == 0:
                    draw.ellipse(box, fill=colour)
                elif shape == 1:
                    draw.rectangle(box, fill=colour)
                else:
                    points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)]
                    draw.polygon(points, fill=colour)
            picture = picture.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 2.0))))
        pixels = np.asarray(picture, dtype=np.float32)
        grain = rng.normal(0.0, float(rng.uniform(0, 6)), pixels.shape)
        images.append(np.clip(pixels + grain, 0, 255).transpose(2, 0, 1) / 255.0)
    return np.stack(images).astype(np.float32)


def speed_table(args: argparse.Namespace) -> None:
    """Time every selected variant against float32, alternating, and print the table."""
    pipeline = parse_pipeline(standard_spec())
    model = compile_pipeline(pipeline)
    rng = np.random.default_rng(0)
    # The bench's images, and 16 more like them to calibrate on, as `--calibrate 16` would.
    images = rng.random((args.batch, 3, args.size, args.size), dtype=np.float32)
    calibration = rng.random((16, 3, args.size, args.size), dtype=np.float32)
    float_session = session(model, args.threads, Variant(None))
    float_outputs = {"features": float_session.run(None, {INPUT_NAME: images})[0]}
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    runs: dict[str, Callable[[], object]] = {}
    notes: dict[str, str] = {}
    for name in names:
        variant = VARIANTS[name]
        quantized = (
            model
            if variant.settings is None
            else quantize_with_report(model, calibration, settings=variant.settings).model
        )
        variant_session = session(quantized, args.threads, variant)
        outputs = {"features": variant_session.run(None, {INPUT_NAME: images})[0]}
        error = measure_error(float_outputs, outputs)["features"]
        notes[name] = f"cosine {error.cosine:.6f}, max error {error.max_error:.2%}"
        runs[name] = runner(variant_session, images)
    float_run = runner(float_session, images)

    rates: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    cpu_ratios: dict[str, list[float]] = {name: [] for name in names}
    float_rates: list[float] = []
    for _ in range(args.rounds):
        for name in names:
            pairing = paired(float_run, runs[name], args.seconds)
            images = args.batch * pairing.calls
            float_rates.append(images / pairing.float_wall)
            rates[name].append(images / pairing.variant_wall)
            ratios[name].append(pairing.float_wall / pairing.variant_wall)
            cpu_ratios[name].append(pairing.float_cpu / pairing.variant_cpu)

    print(
        f"standard pipeline, batch {args.batch} x 3 x {args.size}^2, intra-op threads "
        f"{args.threads}, onnxruntime {ort.__version__}, CPU int8: {cpu_int8_support()}"
    )
    print(
        f"medians of {args.rounds} rounds of {args.seconds:g} s, float32 and the variant called "
        "in turn (ratio: float32 time / variant time, per round)"
    )
    print(f"{'variant':<34} {'img/s':>8} {'ratio':>7} {'CPU':>7}  error vs float32 on the batch")
    print(f"{'float32 (baseline)':<34} {statistics.median(float_rates):>8.1f} {1:>7.3f} {1:>7.3f}")
    for name in names:
        print(
            f"{name:<34} {statistics.median(rates[name]):>8.1f} "
            f"{statistics.median(ratios[name]):>7.3f} {statistics.median(cpu_ratios[name]):>7.3f}"
            f"  {notes[name]}"
        )


def calibration_study(args: argparse.Namespace) -> None:
    """Reported error vs the error on other images, by calibration set and headroom."""
    specs = {"standard (bench)": standard_spec()}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        specs[path.stem] = yaml.safe_load(path.read_text())
    size = args.size
    photos = photo_like(32, size, seed=1)
    tests = {
        "photo-like": photos,
        "dark photo-like": (photos * 0.3).astype(np.float32),
        "uniform noise": np.random.default_rng(4).random((16, 3, size, size), np.float32),
    }
    user = photo_like(16, size, seed=2)
    noise = np.random.default_rng(3).random((16, 3, size, size), np.float32)
    no_headroom = dataclasses.replace(DEFAULT_SETTINGS, headroom=1.0)
    # (images sent, add the synthetic set, settings)
    calibrations: dict[str, tuple[np.ndarray | None, bool, Int8Settings]] = {
        "16 photo-like alone, no headroom": (user, False, no_headroom),
        "16 photo-like alone": (user, False, DEFAULT_SETTINGS),
        "16 photo-like + synthetic": (user, True, DEFAULT_SETTINGS),
        "none: synthetic alone": (None, True, DEFAULT_SETTINGS),
        "16 uniform noise alone": (noise, False, DEFAULT_SETTINGS),
    }
    print(
        f"largest relative error (max_error), {size}^2 images: reported (on the images sent, "
        "else the synthetic ones), then measured on 32 other photo-like images, the same "
        "darkened to 30 %, and 16 uniform-noise images. Default: photo-like + synthetic."
    )
    header = "".join(f" {name:>16}" for name in tests)
    print(f"{'pipeline':<18} {'calibration':<33} {'reported':>9}{header}")
    for spec_name, spec in specs.items():
        pipeline = parse_pipeline(spec)
        model = compile_pipeline(pipeline)
        channels, raw = pipeline.input.channels, pipeline.input.dtype == "uint8"

        def as_input(images: np.ndarray, channels: int = channels, raw: bool = raw) -> np.ndarray:
            images = images[:, :channels]
            return np.round(images * 255).astype(np.uint8) if raw else images

        expected = {name: run_model(model, as_input(images)) for name, images in tests.items()}
        for calibration_name, (images, add_synthetic, settings) in calibrations.items():
            quantized = quantize_with_report(
                model,
                None if images is None else as_input(images),
                add_synthetic=add_synthetic,
                settings=settings,
            )
            cells = []
            for name, test in tests.items():
                errors = measure_error(expected[name], run_model(quantized.model, as_input(test)))
                cells.append(f" {max(e.max_error for e in errors.values()):>16.2%}")
            print(
                f"{spec_name:<18} {calibration_name:<33} {quantized.report.max_error:>9.2%}"
                + "".join(cells)
            )


def main() -> None:
    """Parse arguments; print the speed table or the calibration study."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=1.0, help="per timing, per side")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--variants", default="all", help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--calibration", action="store_true", help="the calibration study")
    args = parser.parse_args()
    if args.calibration:
        calibration_study(args)
    else:
        speed_table(args)


if __name__ == "__main__":
    main()
