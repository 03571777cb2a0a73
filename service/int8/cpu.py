"""Which int8 form the CPU that runs a model computes accurately, and the settings for it.

onnxruntime's x86 int8 kernels multiply uint8 activations by int8 weights. With int8 dot
products (AVX512-VNNI, AVX-VNNI, AMX; ARM's dot products) every product is summed in int32. Without
them (AVX2 alone: vpmaddubsw) two neighbouring products are first added in int16, which
saturates: 255 * 127 * 2 = 64,770 > 32,767, and a pipeline measured at 1.5 % max error on a VNNI
CPU measures 4.5 % there, single ops 10-16 %. 7-bit weights (|w| <= 64: 255 * 64 * 2 = 32,640)
never saturate, so those CPUs get them: the same exact int32 sums as a dot-product CPU, at
half the weight resolution (scripts/int8_weights.py, the standard pipeline at 64x64: 2.85 %
max error with 7-bit weights on either class, the same bytes; with 8-bit ones 1.52 % on
AVX512-VNNI and 6.61 % on AVX2 alone).

uint8 weights (MLAS's u8u8 kernels widen to int16 before multiplying: exact too) were not
chosen: they do half the multiply-adds per instruction and lose the symmetric conv kernels,
and they could not be timed on an AVX2-only CPU here.

A model carries the weight bits it was quantized with (WEIGHT_BITS_PROPERTY). 7-bit models
give the same integers on every CPU; an 8-bit model on a CPU without dot products would be
silently worse, so check_runs_here refuses it.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from ...contract.errors import Unsupported

# CPU flags (Linux /proc/cpuinfo) that give onnxruntime int8 dot products, best first.
INT8_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "i8mm", "asimddp")
# Set to a flag list ("avx512_vnni", or "none"), it replaces what /proc/cpuinfo says: an
# operator who wants every node of a mixed cluster to quantize alike says "none" everywhere
# (7-bit weights are exact on every CPU), and an emulated CPU's /proc/cpuinfo is the host's.
CPU_OVERRIDE_VARIABLE = "FEATMAP_INT8_CPU"
# The ONNX metadata property that says which weights an int8 model holds ("7" or "8").
WEIGHT_BITS_PROPERTY = "featmap.int8_weight_bits"

WeightBits = Literal[7, 8]
ActivationType = Literal["uint8", "int8"]


def cpu_int8_support(cpuinfo: str | None = None) -> str:
    """The CPU's int8 dot-product features, e.g. "amx_int8 avx512_vnni", or "none".

    `cpuinfo` is /proc/cpuinfo's text (read when None, unless FEATMAP_INT8_CPU says otherwise);
    where there is none (not Linux), the answer is "unknown (<machine>)".
    """
    if cpuinfo is None:
        override = os.environ.get(CPU_OVERRIDE_VARIABLE, "").strip()
        if override:
            cpuinfo = f"flags: {override.replace(',', ' ')}"
        else:
            try:
                cpuinfo = Path("/proc/cpuinfo").read_text()
            except OSError:
                return f"unknown ({platform.machine() or 'machine'})"
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        # x86 says "flags", ARM says "Features"; every core repeats them.
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    present = [flag for flag in INT8_CPU_FLAGS if flag in flags]
    return " ".join(present) if present else "none"


def has_int8_dot_products(support: str) -> bool:
    """Whether cpu_int8_support's answer names a dot-product feature ("unknown": no)."""
    return any(flag in INT8_CPU_FLAGS for flag in support.split())


def weight_bits_for(support: str) -> WeightBits:
    """The weight bits that are exact on a CPU: 8 with int8 dot products, else 7."""
    return 8 if has_int8_dot_products(support) else 7


def describe_weights(weight_bits: int) -> str:
    """Which weights a model holds and where they are exact, in words."""
    if weight_bits == 8:
        return "8-bit weights (exact on CPUs with int8 dot products)"
    return "7-bit weights (exact on every CPU)"


@dataclass(frozen=True)
class Int8Settings:
    """How quantize_int8 quantizes; the defaults are the fastest accurate choice measured here.

    scripts/int8_speed.py times each alternative against them.
    """

    # uint8 is asymmetric (a ReLU's [0, max] uses all 256 levels) and has onnxruntime's fast
    # x86 conv kernels; int8 activations ran at 0.6x float32 here.
    activation_type: ActivationType = "uint8"
    # Symmetric activations waste half the levels after a ReLU, and run slower here.
    symmetric_activations: bool = False
    # One scale per filter: filters' ranges differ, and it measured as fast as one per tensor.
    per_channel: bool = True
    # 8 or 7 (see the module docstring); None: what the CPU that quantizes computes exactly.
    weight_bits: WeightBits | None = None
    # QDQ is what onnxruntime's CPU provider fuses into integer kernels; QOperator is older.
    quant_format: Literal["qdq", "qoperator"] = "qdq"
    # Zero-pad dense convs' input channels to CONV_CHANNEL_MULTIPLE (the RGB first layer).
    align_channels: bool = True
    # Run few-channel convs followed by a 2x2 max pool on 2x2 blocks (the RGB first layer).
    pooled_conv_blocks: bool = True
    # A uint8 pixel input (the pixel variant) is the first quantized tensor itself, without
    # Cast, Mul and QuantizeLinear (passes.pixels_as_quantized_input).
    pixel_input: bool = True
    # Node names (= layer names) to keep float32, on top of those that must (passes.float_nodes).
    keep_float: tuple[str, ...] = ()
    # Calibrated ranges are widened by this factor: without it, images slightly beyond the
    # calibration set clip, and the error on them is many times the measured one
    # (scripts/int8_speed.py --calibration).
    headroom: float = 1.25

    def for_cpu(self, support: str | None = None) -> Int8Settings:
        """These settings with weight_bits decided: the CPU's choice where it is None."""
        if self.weight_bits is not None:
            return self
        return replace(self, weight_bits=weight_bits_for(support or cpu_int8_support()))


DEFAULT_SETTINGS = Int8Settings()
# What runs exactly on any CPU: for a model that leaves this machine (featmap export-onnx).
PORTABLE_SETTINGS = Int8Settings(weight_bits=7)


def check_runs_here(weight_bits: int, support: str | None = None) -> None:
    """Unsupported when a model with these weight bits would be inexact on this CPU."""
    support = support or cpu_int8_support()
    if weight_bits > 7 and not has_int8_dot_products(support):
        raise Unsupported(
            "precision",
            f"this int8 model holds {describe_weights(weight_bits)}; this CPU has no int8 dot "
            f"products (CPU int8: {support}), where its products saturate int16 and the error "
            "grows several-fold. Quantize it on this CPU (register or send the spec here), or "
            "export it with 7-bit weights (featmap export-onnx, the default)",
        )
