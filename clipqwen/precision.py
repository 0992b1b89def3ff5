"""Numeric precision: the default per machine, and fp32 / bf16 / int8 weight-only for inference.

bf16 halves the weight bytes that bound decoding at batch 1, but is the default only where the
hardware computes it (CUDA GPUs; CPUs with avx512_bf16, AMX or Arm's bf16): emulated, it is no
faster than fp32. int8 keeps the decoder's linear layers as int8 with per-row scales through
optimum-quanto, whose CPU kernel reads the int8 bytes directly (docs/benchmarks.md).
"""

import dataclasses
import importlib
from pathlib import Path

import torch
from transformers.utils import is_torch_bf16_gpu_available


PRECISIONS = ("fp32", "bf16", "int8")
QUANTIZE_INSTALL = 'pip install "clipqwen[quantize]"  (or: pip install optimum-quanto)'
# Flags in /proc/cpuinfo that mean bf16 arithmetic in hardware: AVX-512 BF16 and AMX on x86, BF16 on Arm.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


class PrecisionError(ValueError):
    """A precision that cannot run here; the message says what to install or choose instead."""


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (x86 `flags`, Arm `Features`); empty without
    /proc/cpuinfo. torch has no public test for native bf16: its checks also pass on CPUs that
    emulate it (docs/benchmarks.md)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # the first core's line; every core has the same
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU computes bf16 in hardware (avx512_bf16, amx_bf16 or Arm's bf16 flag)."""
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def default_precision(device: str | torch.device = "cpu", flags: frozenset[str] | None = None) -> str:
    """For captioning: bf16 on CUDA GPUs that support it and CPUs with native bf16, else fp32 (bf16
    captions scored like fp32's, docs/benchmarks.md). Training's rule is choose_precision."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16(flags) else "fp32"
    return "fp32"


def choose_precision(model_args, training_args):
    """The run's TrainingArguments, with bf16 on a CUDA GPU that supports it unless --fp16, --bf16,
    --use_cpu or --auto_bf16 False is given; CPUs stay fp32 (bf16 scored lower, docs/flickr8k.md).
    Rebuilt: setting `.bf16` afterwards would leave Accelerate in fp32 while reporting bf16."""
    if (
        model_args.auto_bf16
        and not (training_args.fp16 or training_args.bf16 or training_args.use_cpu)
        and is_torch_bf16_gpu_available()
    ):
        training_args = dataclasses.replace(training_args, bf16=True)
    return training_args


def resolve_precision(precision: str | None, device: str | torch.device = "cpu") -> str:
    """`auto`/None → default_precision(device); anything else must be one of PRECISIONS."""
    if precision in (None, "", "auto"):
        return default_precision(device)
    if precision not in PRECISIONS:
        raise PrecisionError(f"Unknown precision {precision!r}: use auto, {', '.join(PRECISIONS)}.")
    return precision


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype the model is loaded in: int8 quantizes a bf16 model (its activations stay bf16)."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def require_quantization_library():
    """optimum.quanto, or a PrecisionError that names the extra to install."""
    try:
        quanto = importlib.import_module("optimum.quanto")
    except ImportError as error:
        raise PrecisionError(
            f"--precision int8 needs the optimum-quanto library, which is not installed: "
            f"{QUANTIZE_INSTALL}. Or use --precision bf16 or fp32."
        ) from error
    return quanto


def check_precision_available(precision: str) -> None:
    """Fail before a model loads when the precision needs a library that is missing."""
    if precision == "int8":
        require_quantization_library()


def apply_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Cast the model to fp32 or bf16, or (int8) to bf16 with the decoder's linear layers and LM
    head as int8 with per-row scales: the image tower and the projector run once per image, the decoder once per
    token. Inference only."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"Unknown precision {precision!r}: use {', '.join(PRECISIONS)}.")
    quanto = require_quantization_library() if precision == "int8" else None  # before any cast: fail fast
    model.to(weights_dtype(precision))
    if quanto is not None:
        quanto.quantize(model, weights=quanto.qint8, include=["model.language_model.*", "lm_head"])
        quanto.freeze(model)  # int8 tensors replace the bf16 ones now, not lazily at first call
    return model
