"""Image reliance: the loss with each caption's image swapped for another's, minus the true loss, in nats per token,
computed in the evaluation's own loss pass; and the warning when it stays near zero."""

import logging
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from torch import nn
from transformers import TrainingArguments

from clipqwen.data.cleaning import add_caption_lengths
from clipqwen.data.collator import CaptionCollator
from clipqwen.tiny import bundled_processor, tiny_config
from clipqwen.training.reliance import (
    MIN_IMAGE_RELIANCE,
    RelianceMeter,
    caption_nats,
    derangement,
    warn_if_image_ignored,
)
from clipqwen.training.trainer import CaptionTrainer
from modeling_clipqwen import ClipQwenForConditionalGeneration


CAPTIONS = ["a cat", "a big red dog runs on the beach", "two men", "a bus", "a small boat on a lake", "x"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = ClipQwenForConditionalGeneration(tiny_config()).eval()
    return model, bundled_processor(num_image_tokens=model.config.num_image_tokens)


def pairs(model, images=3, captions_per_image=2, seed=0) -> datasets.Dataset:
    """Caption pairs as the evaluation gets them: each image's captions after each other, cached features."""
    size = model.config.vision_config.projection_dim
    features = np.random.default_rng(seed).standard_normal((images, size), dtype=np.float32)
    rows = {"image_id": [], "caption": [], "vision_embeds": []}
    for image in range(images):
        for k in range(captions_per_image):
            rows["image_id"].append(image)
            rows["caption"].append(CAPTIONS[(image + k) % len(CAPTIONS)])
            rows["vision_embeds"].append(features[image])
    return datasets.Dataset.from_dict(rows).with_format("numpy", columns=["vision_embeds"], output_all_columns=True)


def test_the_derangement_never_gives_a_row_its_own_image():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        count, rows = (int(torch.randint(low, high, (1,), generator=generator)) for low, high in ((2, 6), (2, 12)))
        image_of_row = torch.randint(0, count, (rows,), generator=generator)
        if image_of_row.unique().numel() < 2:
            continue
        images = torch.randn(count, 3, 2, 2, generator=generator)[image_of_row]  # pixel_values-shaped
        source = derangement(images)
        assert (image_of_row[source] != image_of_row).all(), image_of_row
        assert torch.equal(source, derangement(images))  # fixed: the same batch, the same swap
    # five captions of one photo after each other (the evaluation pairs' order): rolling rows by one would mostly
    # hand a caption its own photo again
    assert derangement(torch.tensor([[1.0]] * 5 + [[2.0]] * 5)).tolist() == [5] * 5 + [0] * 5
    assert derangement(torch.tensor([[1.0], [1.0]])) is None and derangement(torch.tensor([[1.0]])) is None


def test_caption_nats_add_up_to_the_models_own_loss(tiny):
    model, processor = tiny
    batch = CaptionCollator(processor, 16)([dict(row) for row in pairs(model)])
    with torch.no_grad():
        nats, tokens = caption_nats(model, batch)
        loss = model(**batch).loss
    assert nats.shape == tokens.shape == (6,) and (tokens > 0).all()
    torch.testing.assert_close(nats.sum() / tokens.sum(), loss)


class ImageEcho(nn.Module):
    """A stand-in captioner whose every position predicts the token its image encodes (`vision_embeds[:, 0]`),
    or, `blind`, the same token whatever the image."""

    def __init__(self, vocab: int = 8, blind: bool = False):
        super().__init__()
        self.config = SimpleNamespace(image_token_id=-1)
        self.lm_head = nn.Identity()
        self.vocab, self.blind = vocab, blind

    def model(self, input_ids, vision_embeds, attention_mask=None, use_cache=None):
        token = torch.zeros_like(vision_embeds[:, 0]) if self.blind else vision_embeds[:, 0]
        hidden = 5.0 * nn.functional.one_hot(token.long(), self.vocab).float()
        return SimpleNamespace(last_hidden_state=hidden[:, None].expand(*input_ids.shape, self.vocab))


def echo_batch(tokens: list[int]) -> dict:
    """One row per entry: a 4-token caption of that token, and an image that encodes it."""
    labels = torch.tensor(tokens)[:, None].repeat(1, 5)
    labels[:, 0] = -100
    return {"input_ids": labels.clamp(min=0), "labels": labels, "vision_embeds": torch.tensor(tokens)[:, None].float()}


def test_a_model_that_reads_the_image_relies_on_it_and_a_blind_one_does_not():
    batch = echo_batch([1, 2, 3, 3])
    reading, blind = RelianceMeter(), RelianceMeter()
    reading.add(reading.rows(ImageEcho(), batch))
    blind.add(blind.rows(ImageEcho(blind=True), batch))
    # with its own image the right token has logit 5, the other 7 have 0; with another image it has 0 and one other 5
    right, wrong = np.log(1 + 7 * np.exp(-5)), np.log(np.exp(5) + 7) - 0
    assert reading.metrics()["loss"] == pytest.approx(right, rel=1e-5)
    assert reading.metrics()["image_reliance"] == pytest.approx(wrong - right, rel=1e-5)
    assert blind.metrics()["image_reliance"] == 0.0


def test_every_fifth_caption_is_scored_with_another_image_and_every_caption_counts_in_the_loss():
    meter = RelianceMeter()
    meter.add(meter.rows(ImageEcho(), echo_batch([1, 2, 3, 4, 5, 6, 7])))  # rows 0 and 5
    right, wrong = np.log(1 + 7 * np.exp(-5)), np.log(np.exp(5) + 7)
    assert meter.sums["tokens"] == 28 and meter.sums["reliant_tokens"] == 8 and meter.sums["skipped"] == 0
    assert meter.metrics()["image_reliance"] == pytest.approx(wrong - right, rel=1e-5)


def test_a_batch_of_one_image_swaps_in_an_earlier_batchs_and_a_first_one_is_left_out():
    meter = RelianceMeter(every=1)
    meter.add(meter.rows(ImageEcho(), echo_batch([4, 4])))  # nothing to swap in yet
    assert meter.sums["skipped"] == 2 and "image_reliance" not in meter.metrics()
    meter.add(meter.rows(ImageEcho(), echo_batch([5])))  # a batch of one row takes image 4
    assert meter.sums["skipped"] == 2 and meter.metrics()["image_reliance"] > 4
    assert meter.sums["tokens"] == 12 and meter.sums["reliant_tokens"] == 4  # the loss still counts every row


def evaluate(model, processor, dataset, tmp_path, batch_size=4):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=batch_size,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to="none",
        use_cpu=True,
        dataloader_pin_memory=False,
    )
    trainer = CaptionTrainer(model=model, args=args, eval_dataset=dataset, data_collator=CaptionCollator(processor))
    return trainer.evaluate()


def test_every_evaluation_reports_reliance_and_the_loss_per_token_in_any_order(tiny, tmp_path):
    model, processor = tiny
    dataset = pairs(model, images=5)
    metrics = evaluate(model, processor, dataset, tmp_path)
    batch = CaptionCollator(processor)([dict(row) for row in dataset])
    with torch.no_grad():
        nats, tokens = caption_nats(model, batch)
    assert metrics["eval_loss"] == pytest.approx(float(nats.sum() / tokens.sum()), rel=1e-5)
    assert metrics["eval_image_reliance"] != 0.0  # a random projector changes the loss with the image
    # scored longest caption first (the `length` column): the same loss, the same reliance up to the batches' mix
    by_length = evaluate(model, processor, add_caption_lengths(dataset, processor.tokenizer), tmp_path)
    assert by_length["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert "eval_image_reliance" in by_length


def test_an_image_blind_model_has_zero_reliance(tiny, tmp_path):
    model, processor = tiny
    blind = ClipQwenForConditionalGeneration(model.config).eval()
    blind.load_state_dict(model.state_dict())
    with torch.no_grad():  # the projector's output no longer depends on the image
        for module in blind.model.multi_modal_projector.modules():
            if isinstance(module, nn.Linear):
                module.weight.zero_()
    metrics = evaluate(blind, processor, pairs(blind, images=4), tmp_path, batch_size=3)
    assert metrics["eval_image_reliance"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("reliance, warns", [(0.004, True), (MIN_IMAGE_RELIANCE - 1e-3, True), (0.8, False)])
def test_a_run_that_ignores_the_image_ends_with_a_warning_naming_the_causes(caplog, reliance, warns):
    metrics = {"eval_image_reliance": reliance, "eval_distinct_captions": 0.02}
    with caplog.at_level(logging.WARNING, logger="clipqwen"):
        assert warn_if_image_ignored(metrics) is warns
    if warns:
        assert "barely uses the image" in caplog.text and "2% of its captions are distinct" in caplog.text
        for cause in ("seed_exact", "--learning_rate", "frozen"):
            assert cause in caplog.text
    else:
        assert caplog.text == ""
    assert warn_if_image_ignored({}) is False  # no loss pass, no verdict
