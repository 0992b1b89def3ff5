"""The image-feature cache: computed once, reused while nothing changes, rebuilt when the vision weights or
the image preprocessing change."""

import numpy as np
import torch

from clipqwen.data.embedded import load_embedded_dataset
from clipqwen.data.feature_cache import add_vision_features


def counting(model):
    calls = []
    original = model.get_vision_embeds
    model.get_vision_embeds = lambda pixel_values: calls.append(len(pixel_values)) or original(pixel_values)
    return calls


def test_features_are_reused_and_rebuilt_when_weights_or_preprocessing_change(make_model, processor, tmp_path):
    data = load_embedded_dataset(8, 0, 0)["train"]
    model = make_model()
    calls = counting(model)
    first = add_vision_features(data, model, processor, tmp_path)
    assert sum(calls) == 8 and "image" not in first.column_names
    expected = model.get_vision_embeds(processor(images=list(data["image"]))["pixel_values"])
    calls.clear()
    torch.testing.assert_close(torch.as_tensor(np.stack(first["vision_embeds"])), expected)

    again = add_vision_features(data, model, processor, tmp_path)
    assert calls == [] and again.cache_files == first.cache_files  # same key: read back, no image decoded

    with torch.no_grad():
        model.model.vision_tower.vision_model.post_layernorm.weight.mul_(2.0)  # other vision weights
    rebuilt = add_vision_features(data, model, processor, tmp_path)
    assert sum(calls) == 8 and rebuilt.cache_files != first.cache_files
    calls.clear()

    processor.image_processor.image_mean = [0.5, 0.5, 0.5]  # other preprocessing
    try:
        reprocessed = add_vision_features(data, model, processor, tmp_path)
    finally:
        processor.image_processor.image_mean = [0.48145466, 0.4578275, 0.40821073]
    assert sum(calls) == 8 and reprocessed.cache_files not in (first.cache_files, rebuilt.cache_files)


def test_other_data_gets_other_features(make_model, processor, tmp_path):
    model = make_model()
    a = add_vision_features(load_embedded_dataset(4, 0, 0, seed=0)["train"], model, processor, tmp_path)
    b = add_vision_features(load_embedded_dataset(4, 0, 0, seed=1)["train"], model, processor, tmp_path)
    assert a.cache_files != b.cache_files
    features_a, features_b = (torch.as_tensor(np.stack(d["vision_embeds"])) for d in (a, b))
    assert not torch.equal(features_a, features_b)


def test_cached_features_use_the_processors_image_path(make_model, processor, tmp_path):
    """An extreme strip goes through the same RGB conversion and aspect-ratio bound as training from pixels."""
    import datasets
    from PIL import Image

    gradient = np.linspace(0, 255, 600)[:, None].repeat(12, 1)  # along the long side
    strip = Image.fromarray(
        np.stack([gradient] * 3 + [np.full((600, 12), 128.0)], -1).astype(np.uint8), "RGBA"
    )  # half transparent
    features = datasets.Features(
        {
            "image_id": datasets.Value("string"),
            "image": datasets.Image(),
            "captions": datasets.List(datasets.Value("string")),
        }
    )
    data = datasets.Dataset.from_dict(
        {"image_id": ["strip"], "image": [strip], "captions": [["a green strip"]]}, features=features
    )
    model = make_model()
    cached = add_vision_features(data, model, processor, tmp_path)
    expected = model.get_vision_embeds(processor(images=[strip])["pixel_values"])
    # pixels within one level of 255 of the processor's (processing_clipqwen.ClipPixels): features within 1e-3 here; a
    # wrong RGB conversion or aspect bound moves them by 0.1-1
    torch.testing.assert_close(torch.as_tensor(np.stack(cached["vision_embeds"])), expected, atol=2e-3, rtol=0)
