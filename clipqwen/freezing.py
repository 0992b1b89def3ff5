"""Which parts of a ClipQwen model train: a training choice, made by the script that trains (as transformers'
`run_clip.py` freezes its towers in the script), not stored in the model's config.

    model = ClipQwenForConditionalGeneration.from_pretrained_backbones(...)
    freeze_backbones(model)                    # the adapter alone trains (the default recipe)
    freeze_backbones(model, language=False)    # the adapter and the decoder train

Frozen weights are set to `requires_grad=False` rather than only left out of the optimizer: weights that still
require grad double the backward cost and memory, and the feature cache relies on a CLIP that never changes.
`from_pretrained` creates parameters with `requires_grad=True`, so call this after loading too.
"""


def freeze_backbones(model, vision: bool = True, language: bool = True):
    """Freeze the CLIP tower (`vision`) and the decoder with its LM head (`language`); the adapter always trains.
    Works on a `ClipQwenForConditionalGeneration` (not a peft wrapper: freeze before adding LoRA). Returns the
    model."""
    model.get_encoder(modality="image").requires_grad_(not vision)
    model.get_decoder().requires_grad_(not language)
    model.adapter.requires_grad_(True)
    return model
