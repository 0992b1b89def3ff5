"""TRL's SFTTrainer trains clipqwen on TRL's vision-language data format, with TRL's own collator and clipqwen's
processor: it supervises exactly what run_captioning supervises, trains, saves and reloads."""

import json

import pytest
import torch
from datasets import Dataset
from PIL import Image
from trl import SFTConfig, SFTTrainer

from clipqwen.presets import LAYOUTS
from clipqwen.tiny import bundled_processor
from clipqwen.training.freezing import freeze_backbones
from modeling_clipqwen import ClipQwenForConditionalGeneration
from processing_clipqwen import ClipQwenProcessor

from conftest import PHOTOS


def coco_rows(count: int = 8):
    rows = [json.loads(line) for line in (PHOTOS / "metadata.jsonl").read_text().splitlines()[:count]]
    return [(Image.open(PHOTOS / row["file_name"]).convert("RGB"), row["captions"][0]) for row in rows]


def prompt_completion(rows):
    """TRL's conversational prompt-completion format: the image in the user turn, the caption as the answer."""
    return Dataset.from_list(
        [
            {
                "images": [image],
                "prompt": [{"role": "user", "content": [{"type": "image"}]}],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": caption}]}],
            }
            for image, caption in rows
        ]
    )


@pytest.fixture
def model_and_processor(make_model):
    model = freeze_backbones(make_model().train())
    processor = bundled_processor(num_image_tokens=model.config.num_image_tokens, prompt=LAYOUTS["clipcap"]["prompt"])
    return model, processor


def sft_trainer(model, processor, dataset, tmp_path, **options):
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        **options,
    )
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)


def test_trls_collator_builds_what_the_processor_builds_for_training(model_and_processor, tmp_path):
    model, processor = model_and_processor
    rows = coco_rows(4)
    trainer = sft_trainer(model, processor, prompt_completion(rows), tmp_path, max_steps=1)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ours = processor(images=[image for image, _ in rows], suffix=[caption for _, caption in rows])
    # the prompt ("Image:" and the placeholders) unsupervised, the caption and one end token supervised
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        torch.testing.assert_close(batch[key], ours[key], rtol=0, atol=0, msg=key)


def test_sft_trainer_trains_saves_and_reloads(model_and_processor, tmp_path, photos):
    model, processor = model_and_processor
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainer = sft_trainer(model, processor, prompt_completion(coco_rows()), tmp_path, max_steps=8)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        before = model.eval()(**batch).loss
    trainer.train()
    with torch.no_grad():
        after = model.eval()(**batch).loss
    assert after < before - 0.1, (before, after)  # the projector learnt the eight captions (of a random decoder)
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)

    out = tmp_path / "trained"
    trainer.save_model(out)
    processor.save_pretrained(out)
    reloaded = ClipQwenForConditionalGeneration.from_pretrained(out).eval()
    reloaded_processor = ClipQwenProcessor.from_pretrained(out)
    assert all(torch.equal(p, dict(reloaded.named_parameters())[name]) for name, p in model.named_parameters())
    assert reloaded.generation_config.eos_token_id == processor.caption_end_token_id  # TRL left it alone
    batch = reloaded_processor(images=photos[:2])
    with torch.no_grad():
        expected = model.eval().generate(**batch, max_new_tokens=5, do_sample=False)
        ids = reloaded.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(ids, expected)


def test_chat_messages_render_the_training_layout(model_and_processor):
    _, processor = model_and_processor
    messages = [
        {"role": "user", "content": [{"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
    ]
    assert processor.apply_chat_template(messages, tokenize=False) == "Image:<|image_pad|>A dog.<|endoftext|>"
    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "Image:<|image_pad|>"  # what the image-text-to-text pipeline prompts with
    processor.prompt = "Photo:<|image_pad|>"  # as run_captioning sets it: the template follows
    assert processor.apply_chat_template(messages[:1], tokenize=False) == "Photo:<|image_pad|>"


def test_messages_with_assistant_only_loss_supervise_what_the_processor_supervises(model_and_processor, tmp_path):
    """TRL's `messages` format with assistant_only_loss: the mask comes from the template's generation markers and
    the processor's offsets (through ProcessorMixin's placeholder expansion), and covers the caption and its end
    token only — the same labels as processor(images, suffix=captions)."""
    model, processor = model_and_processor
    rows = coco_rows(4)
    dataset = Dataset.from_list(
        [
            {
                "images": [image],
                "messages": [
                    {"role": "user", "content": [{"type": "image"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": caption}]},
                ],
            }
            for image, caption in rows
        ]
    )
    trainer = sft_trainer(model, processor, dataset, tmp_path, max_steps=1, assistant_only_loss=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ours = processor(images=[image for image, _ in rows], suffix=[caption for _, caption in rows])
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        torch.testing.assert_close(batch[key], ours[key], rtol=0, atol=0, msg=key)
