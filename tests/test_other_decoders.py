"""Decoders other than Qwen3: a tiny random Llama with its own small tokenizer that has no image token.

The same path as SmolLM2-135M (a Llama loaded from GGUF, see scripts/evidence_frozen_decoder.py): the text tower
comes from `text_config` through AutoModelForCausalLM, the processor adds a placeholder token, and
`match_processor` grows the vocabulary by that one (never trained, never generated) row.
"""

import json
import os

import pytest
import torch
from transformers import CLIPVisionModelWithProjection, LlamaForCausalLM, LlamaModel

from clipqwen.backbones.assemble import from_pretrained_backbones, match_processor
from processing_clipqwen import ClipQwenProcessor

from conftest import PHOTOS
from test_remote_code import assert_fresh_process_matches
from tiny_decoders import END, tiny_llama_config, tiny_llama_model_and_processor, tiny_tokenizer


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def llama(request):
    return tiny_llama_model_and_processor(tie_word_embeddings=request.param)


def test_the_text_tower_is_a_llama_built_from_text_config(llama):
    model, _ = llama
    assert type(model.get_decoder()) is LlamaModel
    assert model.get_decoder().config is model.config.text_config  # one config: resizing updates what is saved
    assert "LlamaDecoderLayer" in model._no_split_modules and "CLIPEncoderLayer" in model._no_split_modules


def test_processor_adds_a_placeholder_and_the_model_grows_one_frozen_row(llama):
    model, processor = llama
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 301 and processor.image_token_id == 300 and processor.caption_end_token_id == 0
    assert model.config.image_token_id == 300 and model.config.text_config.vocab_size == 301
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == 301
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # the new row is frozen with the rest of the decoder: only the projector trains
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("model.multi_modal_projector.")
    }
    # generation ends on the caption end token the labels supervise, and never writes the placeholder
    assert model.generation_config.eos_token_id == 0 and model.generation_config.suppress_tokens == [300]
    # a special token: dropped from decoded captions; literal text that spells it stays text
    assert processor.decode([300, *tokenizer.encode("a dog", add_special_tokens=False)]) == "a dog"
    batch = processor(suffix=["a sign reading <|image_pad|>"])
    assert (batch["input_ids"] == 300).sum() == processor.num_image_tokens and (batch["labels"] == 0).sum() == 1


def test_loss_is_cross_entropy_and_logits_equal_plain_llama(llama, photos):
    model, processor = llama
    batch = processor(images=photos[:2], suffix=["a red circle on the left.", "two cats on a mat."])
    assert (batch["input_ids"][:, 0] == 300).all()
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"]
        ).logits
        text_embeds = model.get_input_embeddings()(batch["input_ids"])
        features = model.get_image_features(batch["pixel_values"]).pooler_output
        mask = model.model.get_placeholder_mask(batch["input_ids"], text_embeds, features)
        embeds = text_embeds.masked_scatter(mask, features)
    keep = batch["labels"][:, 1:].reshape(-1) != -100
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1])[keep], batch["labels"][:, 1:].reshape(-1)[keep]
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)

    llama = LlamaForCausalLM(model.config.text_config).eval()
    llama.model.load_state_dict(model.get_decoder().state_dict())
    llama.lm_head.load_state_dict(model.lm_head.state_dict())
    with torch.no_grad():
        reference = llama(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)


def test_projector_only_training_leaves_the_decoder_and_the_placeholder_row_unchanged(llama, photos):
    model, processor = llama
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**processor(images=photos[:2], suffix=["a dog.", "a cat."])).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name.startswith("model.multi_modal_projector."):
            assert not torch.equal(param, before[name]), name
        else:  # the placeholder row included: the projector output always replaces it
            assert param.grad is None and torch.equal(param, before[name]), name


def test_generation_uses_the_cache_and_never_writes_the_placeholder(llama, photos):
    model, processor = llama
    batch = processor(images=photos[:2], text=["", "A photo of"])
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=6, min_new_tokens=6, output_scores=True, return_dict_in_generate=True
        )
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for _ in range(6):  # the course project's loop: no cache, the whole sequence every step
            step = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits[:, -1]
            step[:, 300] = -float("inf")
            step[:, 0] = -float("inf")  # min_new_tokens
            next_token = step.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
        beams = model.generate(**batch, max_new_tokens=4, num_beams=3)
    assert torch.equal(out.sequences, ids)
    assert all(torch.isinf(scores[:, 300]).all() for scores in out.scores)  # suppressed at every step
    assert (out.sequences[:, batch["input_ids"].shape[1] :] != 300).all() and beams.shape[0] == 2


def test_saved_llama_captioner_loads_in_a_fresh_process_with_identical_outputs(tmp_path):
    model, processor = tiny_llama_model_and_processor()
    folder = tmp_path / "clipqwen-llama"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["text_config"]["model_type"] == "llama" and config["image_token_id"] == 300
    assert json.loads((folder / "generation_config.json").read_text())["suppress_tokens"] == [300]
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in os.listdir(folder))

    photo = sorted(PHOTOS.glob("*.jpg"))[0]
    child = assert_fresh_process_matches(model, processor, folder, photo, tmp_path / "elsewhere")
    assert child["decoder"] == "LlamaModel" and child["image_token_id"] == child["processor_image_token_id"] == 300


def test_from_pretrained_backbones_takes_a_llama_with_per_backbone_options(tmp_path, photos):
    model, processor = tiny_llama_model_and_processor(seed=3)
    CLIPVisionModelWithProjection(model.config.vision_config).save_pretrained(tmp_path / "clip")
    torch.manual_seed(4)
    llama = LlamaForCausalLM(tiny_llama_config(vocab_size=300).text_config)
    llama.save_pretrained(tmp_path / "llama")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "llama")

    assembled = from_pretrained_backbones(
        str(tmp_path / "clip"),
        str(tmp_path / "llama"),
        text_kwargs={"dtype": torch.bfloat16},
        projector_type="mlp2x_gelu",
    )
    assert assembled.get_decoder().dtype == torch.bfloat16 and assembled.model.vision_tower.dtype == torch.float32
    projector = assembled.model.multi_modal_projector
    assert {p.dtype for p in projector.parameters()} == {torch.float32}  # new weights, trained: fp32
    assert assembled.config.image_token_id is None  # only Qwen3's placeholder id is known before the tokenizer
    with pytest.raises(ValueError, match="resize_token_embeddings.*image_token_id"):
        assembled(**processor(images=photos[:1], suffix=["a dog."]))

    from transformers import AutoTokenizer

    from clipqwen.backbones.assemble import tower_image_processor

    processor = ClipQwenProcessor(
        tower_image_processor(), AutoTokenizer.from_pretrained(tmp_path / "llama"), caption_end_token=None
    )
    assert processor.caption_end_token == END  # None: the tokenizer's EOS
    match_processor(assembled, processor)
    for name, tensor in llama.state_dict().items():
        if "embed_tokens" not in name and "lm_head" not in name:
            decoder_name = name.removeprefix("model.")
            assert torch.equal(assembled.get_decoder().state_dict()[decoder_name], tensor.to(torch.bfloat16)), name
    embeddings = assembled.get_input_embeddings().weight
    assert embeddings.shape[0] == 301 and torch.equal(
        embeddings[:300], llama.get_input_embeddings().weight.to(torch.bfloat16)
    )
    with torch.no_grad():
        out = assembled.generate(**processor(images=photos[:1]), max_new_tokens=3, min_new_tokens=3)
    image_tokens = processor.num_image_tokens
    assert out.shape == (1, image_tokens + 3) and (out[0, :image_tokens] == 300).all()

    with pytest.raises(ValueError, match="'revision' is given twice"):
        from_pretrained_backbones(
            str(tmp_path / "clip"), str(tmp_path / "llama"), text_revision="main", text_kwargs={"revision": "v2"}
        )


def test_lora_from_the_run_script_wraps_only_the_decoders_projections(tmp_path):
    # run_captioning's LoRA target is a pattern inside the decoder, not Qwen3's module tree: a Llama gets it too,
    # and CLIP's q_proj / v_proj never do
    from peft.tuners.lora import LoraLayer

    import run_captioning
    from clipqwen.backbones.assemble import tower_image_processor

    model, _ = tiny_llama_model_and_processor(seed=3)
    CLIPVisionModelWithProjection(model.config.vision_config).save_pretrained(tmp_path / "clip")
    tower_image_processor().save_pretrained(tmp_path / "clip")
    LlamaForCausalLM(tiny_llama_config(vocab_size=300).text_config).save_pretrained(tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    args = run_captioning.ModelArguments(
        vision_model_name_or_path=str(tmp_path / "clip"), text_model_name_or_path=str(tmp_path / "llama"), lora_r=4
    )
    model, _ = run_captioning.build_model_and_processor(args)
    wrapped = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    layers = model.config.text_config.num_hidden_layers
    assert len(wrapped) == 4 * layers and all(".model.language_model.layers." in name for name in wrapped)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == {"q_proj", "k_proj", "v_proj", "o_proj"}
