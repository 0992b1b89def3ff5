"""The layouts a new captioner can start from (`run_captioning.py --preset`): projector, image features and
prompt, chosen together."""

# Layouts of a new captioner (`--preset`). `clipcap`, the default, learned from the image with a
# frozen decoder (docs/flickr8k.md): a word before its 8 tokens keeps them off the attention-sink
# first position. `seed_exact` (one token through a Linear, first) is the project's first design; it did not.
DEFAULT_PRESET = "clipcap"
LAYOUTS = {
    "clipcap": dict(
        projector_type="mlp2x_gelu",
        vision_feature_type="pooled",
        num_pooled_image_tokens=8,
        prompt="Image:<|image_pad|>",
    ),
    # learned queries read the tower's feature map (Qwen-VL's resampler): as few tokens as clipcap
    "resampler": dict(
        projector_type="resampler",
        vision_feature_type="patch",
        num_pooled_image_tokens=8,
        prompt="Image:<|image_pad|>",
    ),
    "seed_exact": dict(projector_type="linear", vision_feature_type="pooled", num_pooled_image_tokens=1, prompt=""),
}


def layout_config(preset: str) -> dict:
    """A layout's ClipQwenConfig fields: LAYOUTS[preset] without its prompt, which the processor holds."""
    return {name: value for name, value in LAYOUTS[preset].items() if name != "prompt"}
