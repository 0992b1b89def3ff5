"""The default precision follows the hardware (bf16 only where it is native), the inference precisions really change
the weights, and a missing quantization library is said in one sentence naming what to install."""

import sys
import types

import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from clipqwen import precision
from clipqwen.precision import (
    PrecisionError,
    apply_precision,
    cpu_flags,
    cpu_has_native_bf16,
    default_precision,
    resolve_precision,
)
from clipqwen.tiny import bundled_processor, tiny_config
from modeling_clipqwen import ClipQwenForConditionalGeneration

from conftest import PHOTOS


# Abridged /proc/cpuinfo of the machines these tests stand for.
XEON_AMX = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx2 avx512f avx512bw amx_bf16 amx_tile\n"
EPYC_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
XEON_NO_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni avx512vl\n"  # emulates bf16
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
ARM_OLD = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        (XEON_AMX, True),
        (EPYC_AVX512_BF16, True),
        (ARM_BF16, True),
        (XEON_NO_BF16, False),
        (ARM_OLD, False),
        ("", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native, tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    flags = cpu_flags(path)
    assert cpu_has_native_bf16(flags) is native
    assert default_precision("cpu", flags) == ("bf16" if native else "fp32")


def test_no_cpuinfo_means_no_flags_and_fp32(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert default_precision("cpu", frozenset()) == "fp32"


def test_resolve_precision_names_the_choices_for_a_bad_value():
    assert resolve_precision("bf16") == "bf16" and resolve_precision("int8", "cpu") == "int8"
    assert resolve_precision("auto", "cpu") == default_precision("cpu")
    with pytest.raises(PrecisionError, match="Unknown precision 'int4': use auto, fp32, bf16, int8"):
        resolve_precision("int4")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = ClipQwenForConditionalGeneration(tiny_config()).eval()
    processor = bundled_processor()
    return model, processor, processor(images=[Image.open(PHOTOS / "000000159269.jpg")])


def fresh_copy(model):
    copy = ClipQwenForConditionalGeneration(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_apply_precision_casts_every_weight(name, dtype, tiny):
    model, _, inputs = tiny
    cast = apply_precision(fresh_copy(model).to(torch.bfloat16 if name == "fp32" else torch.float32), name)
    assert {p.dtype for p in cast.parameters()} == {dtype}
    ids = cast.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 3


def test_int8_stores_the_decoder_linears_as_int8_and_still_captions(tiny):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QLinear

    model, _, inputs = tiny
    quantized = apply_precision(fresh_copy(model), "int8")
    decoder = [*quantized.get_decoder().modules(), quantized.lm_head]
    decoder_linears = [m for m in decoder if isinstance(m, torch.nn.Linear)]
    assert decoder_linears and all(isinstance(m, QLinear) for m in decoder_linears)  # the LM head included
    assert all(m.weight._data.dtype == torch.int8 for m in decoder_linears)
    assert not any(isinstance(m, QLinear) for m in quantized.model.vision_tower.modules())  # CLIP runs once per image
    assert quantized.model.vision_tower.dtype == torch.bfloat16
    with torch.no_grad():
        reference = model(**inputs).logits[0, -1]
        logits = quantized(**inputs).logits[0, -1].float()
    # per-row int8 weights round each weight by at most half a step: the logits move little, not arbitrarily
    assert torch.corrcoef(torch.stack([reference, logits]))[0, 1] > 0.9
    ids = quantized.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 3


def test_int8_without_its_library_names_the_extra_before_touching_the_model(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # what a missing package looks like to import
    model, _, _ = tiny
    copy = fresh_copy(model)
    with pytest.raises(PrecisionError, match=r'needs the optimum-quanto library.*pip install "clipqwen\[quantize\]"'):
        apply_precision(copy, "int8")
    assert {p.dtype for p in copy.parameters()} == {torch.float32}  # refused before any cast


# ---- choose_precision ----------------------------------------------------------------------------------------------
@pytest.fixture
def choose(monkeypatch, tmp_path):
    """choose_precision on a machine without CUDA whose CPU has (or lacks) native bf16, as the flags say."""
    monkeypatch.setattr(precision, "is_torch_bf16_gpu_available", lambda: False)

    def choose(native: bool, **flags):
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"} if native else {"avx2"}))
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", **flags)
        return precision.choose_precision(types.SimpleNamespace(auto_bf16=True), args)

    return choose


@pytest.mark.parametrize("native", [True, False])
def test_training_on_a_cpu_stays_fp32_even_with_native_bf16(native, choose):
    """bf16 training scored below fp32 on Flickr8k val, 3 seeds each (docs/flickr8k.md): on a CPU it is opt-in."""
    assert not choose(native=native).bf16
    opted_in = choose(native=native, bf16=True, use_cpu=True)
    assert opted_in.bf16 and opted_in.use_cpu


def test_the_training_benchmark_times_the_precision_the_main_job_trains_in(choose):
    """benchmarks/bench_train.py's `ours` row: on a CPU with native bf16, captioning defaults to bf16 but training
    to fp32, and the row must time the latter."""
    from benchmarks.bench_train import WEIGHTS_OF
    from benchmarks.common import resolve_weights

    choose(native=True)  # the fixture's CPU flags: native bf16, no CUDA
    assert resolve_weights(torch.device("cpu"), "default") == "bf16"
    assert resolve_weights(torch.device("cpu"), WEIGHTS_OF["ours"]) == "fp32"


def test_inference_defaults_to_bf16_only_where_it_is_native(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512f"}))
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512bw"}))
    assert resolve_precision("auto", "cpu") == "fp32"
