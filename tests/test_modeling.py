import json

import pytest
import torch
from transformers import CLIPVisionModelWithProjection, Qwen3ForCausalLM, Qwen3Model
from transformers.modeling_outputs import BaseModelOutputWithPooling

from clipqwen.backbones.assemble import from_pretrained_backbones, match_processor
from clipqwen.tiny import tiny_config
from clipqwen.training.freezing import freeze_backbones
from modeling_clipqwen import ClipQwenForConditionalGeneration

from conftest import PHOTOS, ROOT, ROUNDING


def inputs_for(processor, images, captions=None, num_image_tokens=8):
    previous, processor.num_image_tokens = processor.num_image_tokens, num_image_tokens
    try:
        return processor(images=images, suffix=captions)
    finally:
        processor.num_image_tokens = previous


@pytest.mark.parametrize("feature_type", ["pooled", "patch"])
def test_vision_part_equals_plain_clip(make_model, processor, photos, feature_type):
    model = make_model(vision_feature_type=feature_type)
    clip = CLIPVisionModelWithProjection(model.config.vision_config).eval()
    clip.load_state_dict(model.model.vision_tower.state_dict())
    pixel_values = processor(images=photos)["pixel_values"]
    with torch.no_grad():
        ours = model.get_vision_embeds(pixel_values)
        if feature_type == "pooled":
            reference = clip(pixel_values=pixel_values).image_embeds
        else:
            reference = clip(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_text_part_logits_equal_qwen3_for_causal_lm(make_model):
    model = make_model()
    assert type(model.get_decoder()) is Qwen3Model  # the default text tower, built through AutoModel
    qwen = Qwen3ForCausalLM(model.config.text_config).eval()
    qwen.model.load_state_dict(model.get_decoder().state_dict())
    qwen.lm_head.load_state_dict(model.lm_head.state_dict())
    embeds = torch.randn(2, 7, model.config.text_config.hidden_size) * 0.02
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    with torch.no_grad():
        ours = model(inputs_embeds=embeds, attention_mask=mask).logits
        reference = qwen(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"projector_type": "mlp2x_gelu"},
        {"num_pooled_image_tokens": 4},
        {"vision_feature_type": "patch", "projector_type": "mlp2x_gelu"},
        {"vision_feature_type": "patch", "projector_type": "resampler", "num_query_tokens": 3},
        {"vision_feature_type": "grid", "num_pooled_image_tokens": 2},
    ],
)
def test_loss_equals_hand_computed_cross_entropy(make_model, processor, photos, overrides):
    model = make_model(**overrides)
    batch = inputs_for(processor, photos[:2], ["A dog runs on the beach.", "Two cats."], model.config.num_image_tokens)
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"]
        ).logits
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    keep = shift_labels != -100
    expected = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # Trainer's num_items_in_batch turns the mean into sum / count across accumulated micro-batches
    with torch.no_grad():
        summed = model(**batch, num_items_in_batch=torch.tensor(1)).loss
    torch.testing.assert_close(summed, expected * keep.sum(), rtol=1e-5, atol=1e-4)


def test_placeholder_count_mismatch_is_a_clear_error(make_model, processor, photos):
    model = make_model(num_pooled_image_tokens=2)
    batch = processor(images=photos[:1], suffix=["A dog."])  # eight placeholders, the model wants two
    with pytest.raises(ValueError, match="8 image placeholder tokens .* 2 feature vectors"):
        model(**batch)


def test_frozen_backbones_do_not_change_and_loading_freezes_nothing(make_model, processor, photos, tmp_path):
    model = freeze_backbones(make_model().train())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable == list(model.model.multi_modal_projector.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all of them: frozen ones must not move anyway
    model(**processor(images=photos[:2], suffix=["A dog.", "A cat."])).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name.startswith("model.multi_modal_projector."):
            assert not torch.equal(param, before[name]), name
        else:
            assert param.grad is None and torch.equal(param, before[name]), name

    model.save_pretrained(tmp_path)
    reloaded = ClipQwenForConditionalGeneration.from_pretrained(tmp_path)
    assert all(p.requires_grad for p in reloaded.parameters())  # a training choice, made again by the trainer
    projector = {
        n for n, _ in model.model.multi_modal_projector.named_parameters(prefix="model.multi_modal_projector")
    }
    assert {n for n, p in freeze_backbones(reloaded).named_parameters() if p.requires_grad} == projector


def test_freezing_the_language_model_is_a_training_switch(make_model):
    model = freeze_backbones(make_model(), language=False)
    assert all(p.requires_grad for p in [*model.get_decoder().parameters(), *model.lm_head.parameters()])
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())


def naive_greedy(model, batch, new_tokens):
    """The course project's loop: no cache, the whole sequence every step."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
    return ids


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"vision_feature_type": "patch"},
        {"vision_feature_type": "patch", "projector_type": "resampler"},
        {"vision_feature_type": "grid"},
    ],
)
def test_greedy_with_kv_cache_equals_naive_loop(make_model, processor, photos, overrides):
    model = make_model(**overrides)
    batch = inputs_for(processor, photos[:1], num_image_tokens=model.config.num_image_tokens)
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        naive = naive_greedy(model, batch, 8)
    assert torch.equal(cached, naive)


def test_batched_left_padded_generation_equals_one_by_one(make_model, processor, photos):
    model = make_model()
    prompts = ["", "A photo of", "", "Look:"]  # different prompt lengths force left padding
    with torch.no_grad():
        batched = model.generate(**processor(images=photos, text=prompts), max_new_tokens=6, min_new_tokens=6)
        width = batched.shape[1]
        for i, (image, prompt) in enumerate(zip(photos, prompts)):
            single = model.generate(**processor(images=[image], text=[prompt]), max_new_tokens=6, min_new_tokens=6)
            assert torch.equal(batched[i, width - 6 :], single[0, -6:])


def test_beam_search_static_cache_and_sampling_run(make_model, processor, photos):
    model = make_model()
    batch = processor(images=photos[:2])
    with torch.no_grad():
        greedy = model.generate(**batch, max_new_tokens=5, min_new_tokens=5)
        static = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, cache_implementation="static")
        beams = model.generate(**batch, max_new_tokens=5, num_beams=3, num_return_sequences=2)
        sampled = model.generate(**batch, max_new_tokens=5, do_sample=True, top_p=0.9, temperature=0.7)
        from_cache = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            vision_embeds=model.get_vision_embeds(batch["pixel_values"]),
            max_new_tokens=5,
            min_new_tokens=5,
        )
    assert torch.equal(greedy, static) and torch.equal(greedy, from_cache)
    assert beams.shape[0] == 4 and sampled.shape[0] == 2


@pytest.mark.parametrize("images, beams", [(1, 1), (2, 3)])
def test_the_lm_head_reads_a_tensor_in_standard_strides_in_every_generation_step(
    make_model, processor, photos, images, beams
):
    """The prefill's last positions are a strided slice; a CPU bf16 linear layer given one takes a slow path (a
    beam-3 prefill of 64 photos: 30 s instead of 0.06 s; one row of Qwen3's LM head: 1.9 s instead of 34 ms). At one
    row the slice counts as contiguous, so the strides themselves are checked."""
    model = make_model()
    strides = []
    model.lm_head.register_forward_pre_hook(
        lambda module, args: strides.append((args[0].stride(), torch.empty(args[0].shape).stride()))
    )
    with torch.no_grad():
        model.generate(**processor(images=photos[:images]), max_new_tokens=3, min_new_tokens=3, num_beams=beams)
    assert len(strides) == 3 and all(actual == standard for actual, standard in strides)


def test_learns_to_stop_at_end_of_text(make_model, processor, photos):
    """Qwen3-Base pads with its EOS: if labels masked every pad id, the model would never learn to stop."""
    model = freeze_backbones(make_model(), language=False).train()
    captions = ["a dog on a beach.", "two red buses."]
    batch = processor(images=photos[:2], suffix=captions)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model.generate(**processor(images=photos[:2]), max_new_tokens=20)
    assert processor.batch_decode(out) == captions
    assert out.shape[1] < 1 + 20  # stopped before max_new_tokens
    assert (out[:, -1] == model.config.text_config.eos_token_id).all()


def test_from_pretrained_backbones_loads_both_checkpoints(tmp_path):
    config = tiny_config()
    torch.manual_seed(1)
    clip = CLIPVisionModelWithProjection(config.vision_config)
    qwen = Qwen3ForCausalLM(config.text_config)
    clip.save_pretrained(tmp_path / "clip")
    qwen.save_pretrained(tmp_path / "qwen")
    model = from_pretrained_backbones(str(tmp_path / "clip"), str(tmp_path / "qwen"), projector_type="mlp2x_gelu")
    for name, tensor in clip.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], tensor), name
    for name, tensor in qwen.model.state_dict().items():
        assert torch.equal(model.get_decoder().state_dict()[name], tensor), name
    assert torch.equal(model.lm_head.weight, qwen.lm_head.weight)
    assert model.config.projector_type == "mlp2x_gelu"
    freeze_backbones(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("model.multi_modal_projector.")
    }
    model.save_pretrained(tmp_path / "assembled")  # a self-contained folder
    reloaded = ClipQwenForConditionalGeneration.from_pretrained(tmp_path / "assembled")
    projector = model.model.multi_modal_projector
    assert torch.equal(reloaded.model.multi_modal_projector.layers[0].weight, projector.layers[0].weight)


def test_from_pretrained_backbones_takes_any_causal_lm(tmp_path, processor, photos):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    config = tiny_config()
    CLIPVisionModelWithProjection(config.vision_config).save_pretrained(tmp_path / "clip")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=151936)).save_pretrained(tmp_path / "gpt2")
    model = from_pretrained_backbones(str(tmp_path / "clip"), str(tmp_path / "gpt2"))
    assert type(model.get_decoder()) is GPT2Model and model.config.image_token_id is None
    match_processor(model, processor)  # the bundled Qwen3 tokenizer has the placeholder: nothing to grow
    assert model.config.image_token_id == 151655 and model.get_input_embeddings().weight.shape[0] == 151936
    with torch.no_grad():
        out = model.generate(**processor(images=photos[:1]), max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (1, processor.num_image_tokens + 3)


def test_from_pretrained_backbones_rejects_a_model_that_is_not_a_causal_lm(tmp_path):
    config = tiny_config()
    CLIPVisionModelWithProjection(config.vision_config).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="not a causal language model"):
        from_pretrained_backbones(str(tmp_path / "clip"), str(tmp_path / "clip"))


def test_generation_never_writes_the_image_placeholder(make_model, processor, photos):
    model = make_model()
    assert model.generation_config.suppress_tokens == [151655]
    with torch.no_grad():
        out = model.generate(
            **processor(images=photos[:1]),
            max_new_tokens=3,
            min_new_tokens=3,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert all(torch.isinf(scores[:, 151655]).all() for scores in out.scores)


def test_match_processor_is_a_no_op_for_qwen3(make_model, processor):
    model = make_model()

    def state():
        config, embeddings = model.config, model.get_input_embeddings()
        return config.image_token_id, embeddings.weight.shape, model.generation_config.to_dict()

    before = state()
    match_processor(model, processor)
    assert state() == before


def test_from_pretrained_with_loading_info(make_model, tmp_path):
    """transformers' `output_loading_info=True` returns (model, info); it used to crash (freezing the tuple)."""
    make_model().save_pretrained(tmp_path)
    model, info = ClipQwenForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, ClipQwenForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_return_dict_false_gives_the_output_as_a_tuple(make_model, processor, photos):
    model = make_model()
    batch = processor(images=photos[:2])
    with torch.no_grad():
        as_dict = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        loss_first = model(**processor(images=photos[:2], suffix=["a dog.", "a cat."]), return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.logits)
    assert loss_first[0].ndim == 0  # loss first, as in every transformers model


@pytest.mark.parametrize("feature_type", ["pooled", "patch"])
def test_get_image_features_returns_clip_outputs_with_the_projector_output_as_pooler_output(
    make_model, processor, photos, feature_type
):
    model = make_model(vision_feature_type=feature_type)
    pixel_values = processor(images=photos[:2])["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values)
        with_states = model.get_image_features(pixel_values, output_hidden_states=True)
        as_tuple = model.get_image_features(pixel_values, return_dict=False)
        from_cache = model.get_image_features(vision_embeds=model.get_vision_embeds(pixel_values))
    vision, tokens = model.config.vision_config, model.config.num_image_tokens
    assert isinstance(out, BaseModelOutputWithPooling) and isinstance(as_tuple, tuple)
    assert out.pooler_output.shape == (2, tokens, model.config.text_config.hidden_size)
    assert out.last_hidden_state.shape == (2, 50, vision.hidden_size) and out.hidden_states is None
    assert len(with_states.hidden_states) == vision.num_hidden_layers + 1
    torch.testing.assert_close(with_states.pooler_output, out.pooler_output, rtol=0, atol=0)
    torch.testing.assert_close(from_cache.pooler_output, out.pooler_output, rtol=0, atol=0)
    with torch.no_grad():
        forward = model(**inputs_for(processor, photos[:2], num_image_tokens=tokens))
    torch.testing.assert_close(forward.image_hidden_states, out.pooler_output, rtol=0, atol=0)
    assert forward.image_outputs.last_hidden_state.shape == out.last_hidden_state.shape


def test_the_model_has_no_side_effects_on_its_config(make_model, tmp_path):
    model = make_model()
    assert getattr(model.config, "auto_map", None) is None  # written by save_pretrained, not by __init__
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForImageTextToText"] == saved["auto_map"]["AutoModel"]
    assert not any(key.startswith("freeze_") for key in saved)
    assert model.base_model is model.model and model.get_decoder() is model.model.language_model


BEFORE_SPLIT = ROOT / "tests" / "fixtures" / "clipqwen-before-split"


def test_a_folder_saved_before_the_base_head_split_loads_unchanged(tmp_path):
    """A tiny Llama captioner (untied LM head) saved by the release that kept vision_model, adapter and
    language_model on one class (tests/fixtures/make_clipqwen_before_split.py): every tensor lands where it belongs,
    it computes the logits it computed then, and it saves back in the same layout."""
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import load_file

    from clipqwen.inference.loading import saved_state_dict
    from processing_clipqwen import ClipQwenProcessor

    model, info = ClipQwenForConditionalGeneration.from_pretrained(BEFORE_SPLIT, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    old_names = {
        "adapter.layers.0.weight": model.model.multi_modal_projector.layers[0].weight,
        "language_model.lm_head.weight": model.lm_head.weight,
        "language_model.model.norm.weight": model.model.language_model.norm.weight,
        "vision_model.visual_projection.weight": model.model.vision_tower.visual_projection.weight,
    }
    with safe_open(BEFORE_SPLIT / "model.safetensors", framework="pt") as saved:
        for name, parameter in old_names.items():
            assert torch.equal(saved.get_tensor(name), parameter), name
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)  # untied, and kept apart

    processor = ClipQwenProcessor.from_pretrained(BEFORE_SPLIT)
    expected = load_file(BEFORE_SPLIT.with_name(BEFORE_SPLIT.name + "-expected.safetensors"))
    photo = Image.open(PHOTOS / "000000078499.jpg")
    batch = processor(images=[photo], text=["a"])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    # the pixels that release computed: its processor called the image processor itself (the processor's faster
    # resize now differs by at most one 8-bit level, test_images.py); this test is about the weights
    batch["pixel_values"] = processor.image_processor(images=[photo], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model.eval()(**batch).logits[:, -1]
    torch.testing.assert_close(logits, expected["last_logits"], **ROUNDING)

    model.save_pretrained(tmp_path)
    resaved = load_file(tmp_path / "model.safetensors")
    assert resaved.keys() == load_file(BEFORE_SPLIT / "model.safetensors").keys() == saved_state_dict(model).keys()


def test_images_with_inputs_embeds_go_where_the_placeholder_embeddings_are(make_model, processor, photos):
    """LLaVA's rule: with `inputs_embeds` instead of `input_ids`, the positions holding the placeholder's embedding
    take the image features; images are never dropped."""
    model = make_model()
    batch = processor(images=photos[:2], text=["", "A photo of"])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        from_ids = model(**batch).logits
        from_embeds = model(
            inputs_embeds=embeds, pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"]
        ).logits
        text_only = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(from_embeds, from_ids, rtol=0, atol=0)
    assert not torch.allclose(text_only, from_ids)
