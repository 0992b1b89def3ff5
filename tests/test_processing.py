import numpy as np
import pytest
import torch
from PIL import Image

from processing_clipqwen import ClipQwenProcessor


ENDOFTEXT, IMAGE_PAD = 151643, 151655


def test_the_bundled_tokenizer_is_the_real_qwen3_one(processor):
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 151669
    ids = tokenizer.encode("A dog runs on the beach.", add_special_tokens=False)
    assert ids == [32, 5562, 8473, 389, 279, 11321, 13]
    assert (processor.image_token_id, processor.caption_end_token_id) == (IMAGE_PAD, ENDOFTEXT)


def test_training_labels_supervise_the_caption_and_exactly_one_end_token(processor, photos):
    captions = ["A dog runs on the beach.", "Hi", "A much longer caption about a red bus in the city."]
    batch = processor(images=photos[:3], suffix=captions)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (3, 3, 224, 224)
    n = processor.num_image_tokens
    for i, caption in enumerate(captions):
        caption_ids = processor.tokenizer.encode(caption, add_special_tokens=False)
        length = int(mask[i].sum())
        assert (ids[i, :n] == IMAGE_PAD).all() and (labels[i, :n] == -100).all()  # placeholders are never targets
        assert labels[i, n:length].tolist() == caption_ids + [ENDOFTEXT]
        assert (labels[i] == ENDOFTEXT).sum() == 1  # one supervised EOS, even though pad == EOS
        assert (labels[i, length:] == -100).all() and (mask[i, length:] == 0).all()  # right padding
        assert (ids[i, length:] == ENDOFTEXT).all()  # Qwen3-Base pads with its EOS


def test_prompt_tokens_are_not_supervised(processor, photos):
    batch = processor(images=photos[:1], text=["A photo of"], suffix=["a dog."])
    prompt_len = len(processor.tokenizer.encode("A photo of", add_special_tokens=False))
    labels, n = batch["labels"][0].tolist(), processor.num_image_tokens
    assert labels[: n + prompt_len] == [-100] * (n + prompt_len)
    assert labels[n + prompt_len :] == processor.tokenizer.encode("a dog.", add_special_tokens=False) + [ENDOFTEXT]


def test_long_captions_are_truncated_and_keep_their_end_token(processor, photos):
    batch = processor(images=photos[:1], suffix=[" ".join(["word"] * 500)], max_caption_length=32)
    supervised = batch["labels"][0][batch["labels"][0] != -100]
    assert len(supervised) == 32 and supervised[-1] == ENDOFTEXT


def test_literal_special_tokens_in_captions_stay_text(processor, photos):
    batch = processor(images=photos[:1], suffix=["a sign reading <|endoftext|> and <|image_pad|>"])
    assert (batch["input_ids"] == IMAGE_PAD).sum() == processor.num_image_tokens  # only the real placeholders
    assert (batch["labels"] == ENDOFTEXT).sum() == 1  # only the real end token


def test_inference_inputs_are_left_padded_without_end_token(processor, photos):
    batch = processor(images=photos[:2], text=["", "A photo of"])
    assert "labels" not in batch
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = processor.num_image_tokens
    assert ids[1].tolist() == [IMAGE_PAD] * n + processor.tokenizer.encode("A photo of", add_special_tokens=False)
    assert ids[0, -1] == IMAGE_PAD and mask[0, 0] == 0  # left padding: generation continues from the right
    assert ENDOFTEXT not in ids[1].tolist()


def test_text_only_inputs_for_cached_features(processor):
    batch = processor(suffix=["a dog.", "a cat on a mat."])
    assert "pixel_values" not in batch and batch["input_ids"].shape[0] == 2
    # for generation from cached features: the processor's prompt, or a prompt with the placeholder
    n = processor.num_image_tokens
    assert processor(text=["", "<|image_pad|>A"])["input_ids"].tolist() == [
        [ENDOFTEXT] + [IMAGE_PAD] * n,
        [IMAGE_PAD] * n + processor.tokenizer.encode("A"),
    ]


def test_real_photos_go_through_clip_preprocessing(processor, photos):
    pixel_values = processor(images=photos)["pixel_values"]
    assert pixel_values.shape == (len(photos), 3, 224, 224)
    # OpenAI CLIP normalisation: values span roughly [-1.8, 2.2], not [0, 1]
    assert pixel_values.min() < -1.0 and pixel_values.max() > 1.5
    ip = processor.image_processor
    assert ip.size == {"shortest_edge": 224} and ip.crop_size == {"height": 224, "width": 224} and ip.resample == 3
    np.testing.assert_allclose(ip.image_mean, [0.48145466, 0.4578275, 0.40821073])


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "RGB"])
def test_any_pil_mode_becomes_the_right_rgb_image(processor, mode):
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    if mode == "I;16":
        image = Image.fromarray(np.full((64, 64), 32896, dtype=np.uint16))  # 16-bit mid-grey
    elif mode == "P":
        image = grey.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = grey.convert(mode)
    expected = processor(images=[grey])["pixel_values"]
    torch.testing.assert_close(processor(images=[image])["pixel_values"], expected, atol=0.05, rtol=0)


def test_transparent_pixels_become_white_not_black(processor):
    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    torch.testing.assert_close(
        processor(images=[transparent])["pixel_values"], processor(images=[white])["pixel_values"]
    )


def test_an_unknown_argument_is_refused_not_ignored(processor):
    with pytest.raises(TypeError, match="unexpected keyword argument.*captions"):
        processor(captions=["a dog."])  # suffix= is the captions' name: ignored, the labels would be missing


def test_mismatched_batch_sizes_raise(processor, photos):
    with pytest.raises(ValueError, match=r"2 captions \(suffix\) for a batch of 3"):
        processor(images=photos[:3], suffix=["a", "b"])


def test_save_and_reload_keeps_settings_and_caption_template(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = ClipQwenProcessor.from_pretrained(tmp_path)
    assert reloaded.num_image_tokens == processor.num_image_tokens
    assert reloaded.caption_end_token == "<|endoftext|>" and reloaded.image_token == "<|image_pad|>"
    rendered = reloaded.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A photo of"}]}], tokenize=False
    )
    assert rendered == "<|image_pad|>A photo of"  # no <|im_start|> markup the captioner never saw


@pytest.mark.parametrize("size", [(1, 10000), (10000, 1), (3000, 200)])
def test_extreme_strips_are_cropped_before_resizing_not_blown_up(processor, size):
    strip = Image.new("RGB", size, (200, 30, 30))
    pixel_values = processor(images=[strip])["pixel_values"]  # without the crop: 224 × 2,240,000 pixels first
    assert pixel_values.shape == (1, 3, 224, 224)
    square = processor(images=[Image.new("RGB", (64, 64), (200, 30, 30))])["pixel_values"]
    torch.testing.assert_close(pixel_values, square, atol=0.02, rtol=0)


def test_a_tokenizer_without_the_placeholder_gets_it_as_a_special_token(tmp_path):
    from clipqwen.backbones.assemble import tower_image_processor

    from tiny_decoders import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    assert "<|image_pad|>" not in tokenizer.get_vocab()
    processor = ClipQwenProcessor(tower_image_processor(), tokenizer, num_image_tokens=2)
    assert processor.image_token_id == len(tokenizer) - 1 == 300
    batch = processor(suffix=["a dog."])
    assert batch["input_ids"][0, :2].tolist() == [300, 300] and batch["labels"][0, :2].tolist() == [-100, -100]
    assert processor.decode(batch["input_ids"][0]) == "a dog."  # placeholders and end token are dropped
    processor.save_pretrained(tmp_path)
    reloaded = ClipQwenProcessor.from_pretrained(tmp_path)
    # saved with the tokenizer, not added twice
    assert reloaded.image_token_id == 300 and len(reloaded.tokenizer) == 301
    rendered = reloaded.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    assert rendered == "<|image_pad|>"


def test_the_caption_template_writes_the_processors_own_placeholder(processor):
    custom = ClipQwenProcessor(processor.image_processor, processor.tokenizer, image_token="<|vision_pad|>")
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A"}]}
    rendered = custom.apply_chat_template([message], tokenize=False)
    assert rendered == "<|vision_pad|>A" and custom.image_token_id == 151654


CHILD_LOAD = """
import sys, warnings
from processing_clipqwen import ClipQwenProcessor
processor = ClipQwenProcessor.from_pretrained(sys.argv[1])
print(type(processor.tokenizer).__name__, processor.image_token_id)
"""


def test_the_installed_class_loads_a_saved_model_folder_without_a_remote_code_prompt(make_model, processor, tmp_path):
    """The folder's config.json names remote code (auto_map); the installed processor class must not ask to run it
    (a prompt that blocks a script) nor read it as a model config (the "model of type ``" warning)."""
    import subprocess
    import sys

    from conftest import ROOT

    make_model().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", CHILD_LOAD, str(tmp_path)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["Qwen2Tokenizer", str(IMAGE_PAD)]
    assert "custom code" not in result.stderr and "model of type" not in result.stderr, result.stderr[-2000:]


def test_padding_is_the_tokenizers_own_and_model_input_names_are_the_base_ones(processor, photos):
    training = processor(images=photos[:2], suffix=["a dog.", "two red buses in the city."])
    inference = processor(images=photos[:2], text=["", "A photo of"])
    reference = processor.tokenizer.pad({"input_ids": [[1, 2], [3]]}, padding_side="right")
    assert reference["attention_mask"] == [[1, 1], [1, 0]]
    assert training["attention_mask"][0, -1] == 0 and inference["attention_mask"][0, 0] == 0  # right / left
    assert set(training) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert processor.model_input_names == [
        *processor.image_processor.model_input_names,
        *processor.tokenizer.model_input_names,
    ]


def test_a_prompt_without_placeholder_goes_after_the_processors_image_prompt(processor, photos):
    clipcap = ClipQwenProcessor(processor.image_processor, processor.tokenizer, prompt="Image:<|image_pad|>")
    assert clipcap.image_prompt == "Image:<|image_pad|>" and processor.image_prompt == "<|image_pad|>"
    encode = processor.tokenizer.encode
    ids = clipcap(images=photos[:1], text=["A photo of"])["input_ids"][0].tolist()
    n = clipcap.num_image_tokens
    assert ids == encode("Image:") + [IMAGE_PAD] * n + encode("A photo of")
    assert clipcap(images=photos[:1])["input_ids"][0].tolist() == encode("Image:") + [IMAGE_PAD] * n
    with pytest.raises(ValueError, match="holds 2 image placeholders"):
        clipcap(images=photos[:1], text=["<|image_pad|> and <|image_pad|>"])


def test_chat_format_inputs_one_image_per_sample_and_text_alone(processor, photos):
    nested = processor(images=[[photos[0]], [photos[1]]], text=["", "A"], padding_side="right")
    flat = processor(images=photos[:2], text=["", "A"])
    torch.testing.assert_close(nested["pixel_values"], flat["pixel_values"], rtol=0, atol=0)
    assert nested["attention_mask"][0, -1] == 0 and flat["attention_mask"][0, 0] == 0  # padding_side is obeyed
    with pytest.raises(ValueError, match="A sample has 2 images"):
        processor(images=[photos[:2]], text=[""])
    # text alone (a completion, as TRL's collator sends it): its own tokens, special ones included, no image
    completion = processor(text=["a dog.<|endoftext|>"])
    assert completion["input_ids"][0].tolist() == processor.tokenizer.encode("a dog.") + [ENDOFTEXT]


def test_processor_mixin_options_act_on_the_whole_training_sequence(processor, photos):
    n, encode = processor.num_image_tokens, processor.tokenizer.encode
    padded = processor(images=photos[:2], suffix=["a dog.", "hi"], padding="max_length", max_length=n + 12)
    assert padded["input_ids"].shape == (2, n + 12) and padded["attention_mask"][0].sum() == n + 4
    cut = processor(images=photos[:1], suffix=["a dog and a cat on a bus"], truncation=True, max_length=n + 3)
    assert cut["labels"][0].tolist() == [-100] * n + encode("a dog and")  # cut on the right, after the image
    types = processor(images=photos[:1], return_mm_token_type_ids=True)["mm_token_type_ids"]
    assert types[0].tolist() == [1] * n  # what vLLM-style callers read to find the image positions


def test_images_may_be_paths_as_in_other_transformers_processors(processor):
    from conftest import PHOTOS

    path = sorted(PHOTOS.glob("*.jpg"))[0]
    from_path = processor(images=[str(path)])["pixel_values"]
    torch.testing.assert_close(from_path, processor(images=[Image.open(path)])["pixel_values"], rtol=0, atol=0)
