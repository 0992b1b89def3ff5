"""The CPU's prepacked decoder weights (clipqwen.inference.packed_linear): the same captions as the plain layers, a
state dict that saves as before, no copy of a tied LM head, and a front door that says which path ran."""

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import pipeline

from clipqwen.inference import packed_linear
from clipqwen.inference.loading import load_clipqwen
from clipqwen.inference.packed_linear import PackedLinear, decoding_path, pack_decoder_linears, packing_problem
from clipqwen.precision import apply_precision, cpu_has_native_bf16
from clipqwen.tiny import bundled_processor, tiny_config
from modeling_clipqwen import ClipQwenForConditionalGeneration

from conftest import PHOTOS, clear_greedy_ids


DTYPES = ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 emulated"))]


def tiny_model(precision: str = "fp32", **config) -> ClipQwenForConditionalGeneration:
    torch.manual_seed(0)
    return apply_precision(ClipQwenForConditionalGeneration(tiny_config(**config)).eval(), precision)


@pytest.fixture(scope="module")
def batch():
    return bundled_processor()(images=[Image.open(path) for path in sorted(PHOTOS.glob("*.jpg"))[:3]])


CAPTION = dict(max_new_tokens=12, min_new_tokens=12)


def greedy(model, batch):
    with torch.inference_mode():
        return model.generate(**batch, **CAPTION, do_sample=False, num_beams=1)


@pytest.mark.parametrize("precision", DTYPES)
def test_packed_decoder_captions_as_the_plain_one(precision, batch):
    plain, packed = tiny_model(precision), pack_decoder_linears(tiny_model(precision))
    linears = [m for m in packed.get_decoder().modules() if isinstance(m, (nn.Linear, PackedLinear))]
    assert linears and all(type(m) is PackedLinear for m in linears)  # every per-token product
    assert type(packed.model.multi_modal_projector.layers[0]) is nn.Linear  # once per image: left alone
    # the same products, rounded as another kernel rounds them (bf16 on the EPYC: bit for bit; other CPUs may differ)
    ids = greedy(plain, batch)
    with torch.inference_mode():
        logits = [m(input_ids=ids, pixel_values=batch["pixel_values"]).logits.float() for m in (plain, packed)]
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    torch.testing.assert_close(*logits, rtol=tolerance, atol=tolerance)
    if precision == "fp32":  # where no step is a near tie (a random model has some), the very same caption
        assert torch.equal(greedy(packed, batch), clear_greedy_ids(plain, batch, margin=1e-3, **CAPTION))
    assert decoding_path(plain) == precision
    assert decoding_path(packed) == f"{precision}, decoder weights prepacked for oneDNN"


def test_a_packed_model_saves_the_plain_weights_and_loads_them_back(tmp_path, batch):
    plain = tiny_model()
    packed = pack_decoder_linears(tiny_model())
    saved, expected = packed.state_dict(), plain.state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[key], expected[key]) for key in expected)
    packed.save_pretrained(tmp_path)
    reloaded = ClipQwenForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(greedy(reloaded, batch), greedy(plain, batch))
    other = tiny_model()  # weights loaded into a packed model are packed anew
    other.get_decoder().layers[0].mlp.down_proj.weight.data.mul_(2)
    packed.load_state_dict(other.state_dict())
    layer = packed.get_decoder().layers[0].mlp.down_proj
    assert torch.equal(layer.packed_weight.to_dense(), other.get_decoder().layers[0].mlp.down_proj.weight)


def test_a_tied_lm_head_is_not_copied_and_an_untied_one_is_packed():
    tied = pack_decoder_linears(tiny_model())
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.get_input_embeddings().weight
    untied = pack_decoder_linears(tiny_model(text_config={"tie_word_embeddings": False}))
    assert type(untied.lm_head) is PackedLinear


def test_emulated_bf16_and_int8_are_left_as_they_are(monkeypatch):
    monkeypatch.setattr(packed_linear, "cpu_has_native_bf16", lambda: False)
    model = tiny_model("bf16")
    assert packing_problem(model) == "bf16 is emulated on this CPU"
    assert decoding_path(pack_decoder_linears(model)) == "bf16"
    pytest.importorskip("optimum.quanto")
    int8 = pack_decoder_linears(tiny_model("int8"))
    assert not any(isinstance(m, PackedLinear) for m in int8.modules())
    assert decoding_path(int8) == "int8 (weight-only decoder, optimum-quanto)"


def test_the_loader_packs_by_default_and_not_when_asked(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    bundled_processor().save_pretrained(tmp_path)
    model, _ = load_clipqwen(str(tmp_path), precision="fp32")
    plain, _ = load_clipqwen(str(tmp_path), precision="fp32", pack_weights=False)
    assert decoding_path(model) == "fp32, decoder weights prepacked for oneDNN"
    assert decoding_path(plain) == "fp32"


def test_the_pipeline_captions_with_a_packed_model_as_with_the_plain_one():
    photo = Image.open(sorted(PHOTOS.glob("*.jpg"))[0])
    texts = []
    for model in (tiny_model(), pack_decoder_linears(tiny_model())):
        captioner = pipeline("image-text-to-text", model=model, processor=bundled_processor())
        texts.append(captioner(images=photo, text="", generate_kwargs=CAPTION)[0]["generated_text"])
    assert texts[0] == texts[1] and texts[0].strip()


def test_a_compiled_model_runs_its_packed_layers_eagerly():
    """Inductor cannot lower oneDNN's linear on a weight it did not pack itself (an assertion inside torch); the
    layer runs outside the compiled graph instead of failing the user's torch.compile."""
    torch.manual_seed(0)
    layer, hidden = PackedLinear(nn.Linear(64, 32)), torch.randn(3, 5, 64)
    compiled = torch.compile(lambda x: torch.relu(layer(x)) * 2)
    torch.testing.assert_close(compiled(hidden), torch.relu(layer(hidden)) * 2)
