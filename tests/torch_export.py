"""Export torchvision's own conv stacks to ONNX, with torch's own outputs, for test_torch_stacks.

Run with the torch venv's Python (never featmap's: torch is no dependency of featmap):

    .venv-torch/bin/python tests/torch_export.py OUT_DIR [--size 224] [--images 2] [MODEL ...]
    .venv-torch/bin/python tests/torch_export.py --probe   # imports all it needs, or fails

For each model (``alexnet``, ``vgg11_bn``, ``vgg16``: the ``.features`` of torchvision's
definitions, random init, nothing downloaded) it writes into OUT_DIR:

- ``MODEL.onnx``: ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``; torch
  2.13's default exporter wants onnxscript and folds batch norms itself) and
  ``training=TrainingMode.PRESERVE``, so the BatchNormalization nodes stay in the graph, in
  inference form, for featmap's importer to take;
- ``MODEL.float32.npy`` and ``MODEL.float64.npy``: torch's forward in eval mode on the images,
  in float32 and in float64 (the same weights, widened);

and once ``images.npy`` (float32, N x 3 x size x size, a fixed seed) and ``versions.json``
(torch, torchvision and onnx versions, the opset, and the torchvision op registrations that were
skipped; see ``import_torchvision_models``).

BatchNorm layers get randomised running statistics and affine parameters (the defaults, mean 0,
var 1, weight 1, bias 0, would make them an identity and hide a wrong folding).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

MODELS = ("alexnet", "vgg11_bn", "vgg16")
# featmap's importer takes opsets up to its own (21); the TorchScript exporter's default is 17.
OPSET = 17
SEED = 0


@contextlib.contextmanager
def _tolerate_missing_torchvision_ops(skipped: list[str]) -> Iterator[None]:
    """Let ``torch.library.register_fake`` skip ``torchvision::`` ops that do not exist.

    PyPI's torchvision wheels are built against PyPI's (CUDA) torch: beside the CPU torch their
    native library (``torchvision._C``) does not load, torchvision notices and goes on without
    its ops, but ``torchvision/_meta_registrations.py`` registers fake kernels for
    ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and that raises
    ``RuntimeError: operator torchvision::nms does not exist``. The model definitions need none
    of those ops (they are detection ops: nms, roi_align, deform_conv2d, ...), so while
    torchvision is imported such a registration is skipped and its name recorded; anything else
    goes through unchanged.
    """
    real = torch.library.register_fake

    def guarded(op: str, fn: Callable[..., Any], /, **kwargs: Any) -> Callable[..., Any]:
        try:
            return real(op, fn, **kwargs)
        except RuntimeError as error:
            if not (str(op).startswith("torchvision::") and "does not exist" in str(error)):
                raise
            skipped.append(str(op))
            return fn

    def register_fake(op: Any, func: Any = None, /, **kwargs: Any) -> Any:
        if func is not None:
            return guarded(op, func, **kwargs)
        return lambda fn: guarded(op, fn, **kwargs)

    torch.library.register_fake = register_fake  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.library.register_fake = real


def import_torchvision_models() -> tuple[ModuleType, list[str]]:
    """``torchvision.models`` and the op registrations skipped to import it (none when
    torchvision's native ops load beside this torch)."""
    skipped: list[str] = []
    with _tolerate_missing_torchvision_ops(skipped):
        import torchvision.models as models
    return models, skipped


def _randomise_batch_norms(model: torch.nn.Module, generator: torch.Generator) -> int:
    """Random running mean/var and affine parameters for every BatchNorm2d; how many."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.2 * torch.randn(c, generator=generator))
                count += 1
    return count


def build(models: ModuleType, name: str) -> torch.nn.Module:
    """torchvision's ``name(weights=None).features``, seeded, BN statistics random, eval mode."""
    torch.manual_seed(SEED)
    stack: torch.nn.Module = getattr(models, name)(weights=None).features
    generator = torch.Generator().manual_seed(SEED + 1)
    _randomise_batch_norms(stack, generator)
    return stack.eval()


def export(stack: torch.nn.Module, path: Path, example: torch.Tensor) -> None:
    """TorchScript export, batch norms kept, N/H/W dynamic (constant folding stays on: the
    stack is in eval mode, which is what torch's warning about PRESERVE asks for)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript", DeprecationWarning
        )
        warnings.filterwarnings("ignore", "It is recommended that constant folding", UserWarning)
        _export(stack, path, example)


def _export(stack: torch.nn.Module, path: Path, example: torch.Tensor) -> None:
    torch.onnx.export(
        stack,
        (example,),
        str(path),
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        opset_version=OPSET,
        input_names=["images"],
        output_names=["features"],
        dynamic_axes={"images": {0: "N", 2: "H", 3: "W"}, "features": {0: "N", 2: "H", 3: "W"}},
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="import torch, torchvision.models and onnx; print versions",
    )
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"any of {MODELS} (all)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}: choose from {MODELS}")

    models, skipped = import_torchvision_models()
    import onnx
    import torchvision

    versions = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "opset": OPSET,
        "skipped_registrations": skipped,
    }
    if args.probe:
        print(json.dumps(versions))
        return 0
    if args.out is None:
        parser.error("OUT_DIR is needed (or --probe)")
    args.out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rng = np.random.default_rng(SEED)
    images = rng.standard_normal((args.images, 3, args.size, args.size)).astype(np.float32)
    np.save(args.out / "images.npy", images)
    x = torch.from_numpy(images)
    for name in args.models or MODELS:
        stack = build(models, name)
        export(stack, args.out / f"{name}.onnx", x)
        with torch.no_grad():
            np.save(args.out / f"{name}.float32.npy", stack(x).numpy())
            np.save(args.out / f"{name}.float64.npy", stack.double()(x.double()).numpy())
    (args.out / "versions.json").write_text(json.dumps(versions, indent=1))
    print(json.dumps(versions))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
