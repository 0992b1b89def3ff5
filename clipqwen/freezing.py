"""Which parts of a ClipQwen model train: a training choice, made by the script that trains (as transformers'
`run_clip.py` freezes its towers in the script), not stored in the model's config.

    model = from_pretrained_backbones(...)     # clipqwen.backbones
    freeze_backbones(model)                    # the adapter alone trains (the default recipe)
    freeze_backbones(model, language=False)    # the adapter and the decoder train

Frozen weights are set to `requires_grad=False` rather than only left out of the optimizer: weights that still
require grad double the backward cost and memory, and the feature cache relies on a CLIP that never changes.
`from_pretrained` creates parameters with `requires_grad=True`, so call this after loading too.

`set_training_dtypes` then stores what trains in fp32 (the optimizer updates it in place: bf16 weights would round
away most small updates) and what is frozen in the dtype the run computes in: bf16 for a bf16 run, which halves
the bytes of the frozen decoder (the course kept its Qwen3 in bf16 too) and computes exactly what autocast computes
from fp32 weights (it rounds them to bf16 for every matmul).

`add_lora` last: LoRA on the decoder's linear layers, the adapter trained in full beside it.
"""

import torch
from peft import LoraConfig, get_peft_model


def freeze_backbones(model, vision: bool = True, language: bool = True):
    """Freeze the CLIP tower (`vision`) and the decoder with its LM head (`language`); the adapter always trains.
    Works on a `ClipQwenForConditionalGeneration` (not a peft wrapper: freeze before adding LoRA). Returns the
    model."""
    model.get_encoder(modality="image").requires_grad_(not vision)
    model.get_decoder().requires_grad_(not language)
    model.get_output_embeddings().requires_grad_(not language)
    model.model.multi_modal_projector.requires_grad_(True)
    # the model's train() puts a frozen tower in eval mode; a model already training gets that rule applied now
    return model.train(model.training)


def set_training_dtypes(model, frozen_dtype: torch.dtype = torch.float32):
    """The CLIP tower, the decoder and the adapter each in fp32 if any of its weights train, else in `frozen_dtype`.
    Call after `freeze_backbones`, before adding LoRA (peft keeps its LoRA weights in fp32 by default). Returns the
    model."""
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
    """LoRA of rank `r` on the decoder's modules named in `target_modules` (comma-separated), as a regex inside the
    decoder, whatever its module tree, so that CLIP's q_proj/v_proj are never wrapped; the adapter trains in full.
    Call after `freeze_backbones` and `set_training_dtypes`. Returns the peft model."""
    targets = "|".join(name.strip() for name in target_modules.split(","))
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=rf"model\.language_model\..*\.({targets})",
        modules_to_save=["multi_modal_projector"],
    )
    return get_peft_model(model, lora)
