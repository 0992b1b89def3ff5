"""LoRA during evaluation: captions are written with the adapter merged into the decoder's weights, as
merge_and_unload (the export) folds it, and the frozen decoder comes back bit for bit."""

import copy

import torch

from clipqwen.training.freezing import add_lora, freeze_backbones, lora_merged, set_training_dtypes


def lora_model(make_model):
    """A tiny model as run_captioning trains it with LoRA on a CPU with bf16: frozen parts in bf16, LoRA in fp32, its
    B matrices nonzero (as after training; peft starts them at zero, which would make merging a no-op)."""
    model = add_lora(set_training_dtypes(freeze_backbones(make_model()), torch.bfloat16), 4, 8, 0.0, "q_proj,v_proj")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return model.eval()


def frozen_weights(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "base_layer" in name}


def test_captions_with_lora_merged_are_the_exported_models_and_the_frozen_weights_come_back_exactly(
    make_model, processor, photos
):
    model = lora_model(make_model)
    batch = processor(images=photos[:2], text=["", ""])
    before = frozen_weights(model)
    with torch.no_grad():
        unmerged = model.generate(**batch, max_new_tokens=6, do_sample=False)
        with lora_merged(model):
            assert all(module.merged for module in model.modules() if hasattr(module, "lora_A"))
            merged = model.generate(**batch, max_new_tokens=6, do_sample=False)
        exported = copy.deepcopy(model).merge_and_unload().generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(merged, exported)
    after = frozen_weights(model)
    assert all(torch.equal(after[name], before[name]) for name in before)  # bf16: unmerging alone would round
    assert not any(getattr(module, "merged", False) for module in model.modules())
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), unmerged)


def test_a_model_without_lora_generates_unchanged(make_model, processor, photos):
    model = make_model()
    batch = processor(images=photos[:1], text=[""])
    with torch.no_grad():
        plain = model.generate(**batch, max_new_tokens=4, do_sample=False)
        with lora_merged(model) as same:
            assert same is model
            assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), plain)
