"""Which parts of a ClipQwen model train: the training script's choice (as in `run_clip.py`), not
the config's. Call `freeze_backbones`, then `set_training_dtypes`, then optionally `add_lora`.

Frozen means `requires_grad=False`, not only left out of the optimizer: weights that still require
grad double the backward cost and memory, and the feature cache relies on an image tower that never changes.
"""

from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer


def freeze_backbones(model, vision: bool = True, language: bool = True):
    """Freeze the image tower (`vision`), the decoder and LM head (`language`); the projector trains.
    Call before LoRA, after any `from_pretrained` (it makes every weight trainable). Returns it."""
    model.get_encoder(modality="image").requires_grad_(not vision)
    model.get_decoder().requires_grad_(not language)
    model.get_output_embeddings().requires_grad_(not language)
    model.model.multi_modal_projector.requires_grad_(True)
    # the model's train() puts a frozen tower in eval mode; a model already training gets that rule applied now
    return model.train(model.training)


def set_training_dtypes(model, frozen_dtype: torch.dtype = torch.float32):
    """Each part (image tower, decoder, LM head, projector) in fp32 if any of its weights train (bf16 would
    round away small updates), else in `frozen_dtype` (bf16: half the bytes, what autocast computes
    anyway). Call after `freeze_backbones`, before LoRA. Returns the model."""
    parts = (
        model.get_encoder(modality="image"),
        model.get_decoder(),
        model.get_output_embeddings(),
        model.model.multi_modal_projector,
    )
    for part in parts:
        trains = any(parameter.requires_grad for parameter in part.parameters())
        part.to(torch.float32 if trains else frozen_dtype)
    return model


def add_lora(model, r: int, alpha: int, dropout: float, target_modules: str):
    """LoRA of rank `r` on the decoder's `target_modules` (comma-separated), matched inside the
    decoder only (the image tower's q_proj/v_proj are never wrapped); the projector trains in full. Returns the
    peft model."""
    targets = "|".join(name.strip() for name in target_modules.split(","))
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=rf"model\.language_model\..*\.({targets})",
        modules_to_save=["multi_modal_projector"],
    )
    return get_peft_model(model, lora)


@contextmanager
def lora_merged(model):
    """LoRA folded into the decoder's weights while the block runs, as the exported model has it: each wrapped
    linear then costs what the plain one does (on the Flickr8k recipe's model, a LoRA'd q_proj at 192 rows: 923 µs
    unmerged, 673 merged, 655 plain), ~10 % of a beam-search step (beam-3 captions of 250 val photos in an
    evaluation: 217.6 s unmerged, 195.7 s merged, one core). The frozen weights are put back exactly afterwards:
    unmerging alone would not restore bf16 weights bit for bit. A model without LoRA runs as it is."""
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    if not layers:
        yield model
        return
    frozen = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for layer, weight in zip(layers, frozen):
                layer.get_base_layer().weight.copy_(weight)
