"""Training from cached image-tower features (`vision_embeds`) is the same computation as training from pixels.

The benchmarks and the feature cache rely on it: frozen CLIP ⇒ `get_vision_embeds` can run once per image,
and the loss and projector gradients of a step from those features must equal a step from `pixel_values`.
"""

import pytest
import torch
from torch.testing import assert_close

from clipqwen.tiny import bundled_processor


CAPTIONS = [
    "A patio setting on the beach near the ocean.",
    "Horses standing and laying in grass near a body of water and a mountain.",
    "a bus",
    "Two people walk down a quiet street past parked cars on a sunny afternoon.",
]


def loss_and_projector_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.model.multi_modal_projector.parameters()]


@pytest.mark.parametrize(
    "feature_type, projector",
    [("pooled", "mlp2x_gelu"), ("patch", "mlp2x_gelu"), ("patch", "resampler"), ("grid", "mlp2x_gelu")],
)
def test_loss_from_cached_features_equals_loss_from_pixels(make_model, photos, feature_type, projector):
    model = make_model(vision_feature_type=feature_type, projector_type=projector)
    processor = bundled_processor(num_image_tokens=model.config.num_image_tokens)
    assert processor.num_image_tokens == model.config.num_image_tokens  # 1 pooled, 50 patch (7×7 + CLS)

    from_pixels = processor(images=photos, suffix=CAPTIONS)
    loss_pixels, grads_pixels = loss_and_projector_grads(model, **from_pixels)

    # What a feature cache does: encode each image once, on its own, and store the result.
    with torch.no_grad():
        cache = torch.cat([model.get_vision_embeds(pv[None]) for pv in from_pixels["pixel_values"]])
    text = processor(suffix=CAPTIONS)  # text inputs alone, as when training from the cache
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(text[key], from_pixels[key]), key
    loss_cache, grads_cache = loss_and_projector_grads(model, **text, vision_embeds=cache)

    assert torch.isfinite(loss_pixels)
    assert_close(loss_cache, loss_pixels)
    for grad_cache, grad_pixels in zip(grads_cache, grads_pixels):
        assert_close(grad_cache, grad_pixels)
    # Frozen CLIP: the pixel path left no gradient on it.
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
