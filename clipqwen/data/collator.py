"""Batching: the caption drawn per epoch, images read as the batch is made."""

import random

import numpy as np
import torch
from transformers import TrainerCallback

from .cleaning import read_image


class CaptionCollator:
    """Rows → model inputs: a row's `caption` (expanded mode), or one of its `captions` drawn from
    (seed, epoch, image id), not a global RNG that prefetching advances, so a resumed run draws what
    an uninterrupted one would (`CaptionEpochCallback` keeps `epoch` current). `for_generation`
    makes left-padded prompts. A row whose image is lost is left out, its id in the batch's
    `lost_images` for CaptionTrainer. Pixels come from the processor, by the recipe the cache's come from."""

    def __init__(self, processor, max_caption_length: int | None = None, for_generation: bool = False, seed: int = 0):
        self.processor = processor
        self.max_caption_length = max_caption_length
        self.for_generation = for_generation
        self.seed = seed
        self.epoch = 0

    def pick_caption(self, row: dict) -> str:
        if "caption" in row:
            return row["caption"]
        return random.Random(f"{self.seed}:{self.epoch}:{row['image_id']}").choice(row["captions"])

    def __call__(self, rows: list[dict]) -> dict:
        lost = []
        if "vision_embeds" not in rows[0]:  # decoded by `with_checked_images` already, or an undecoded entry
            rows = [dict(row, image=read_image(row["image"])) for row in rows]
            lost = [row["image_id"] for row in rows if row["image"] is None]
            rows = [row for row in rows if row["image"] is not None]
        if not rows:
            return {"lost_images": lost}
        captions = None if self.for_generation else [self.pick_caption(row) for row in rows]
        # "" per row: the processor's prompt (and the batch size when there are no captions to count)
        images = None if "vision_embeds" in rows[0] else [row["image"] for row in rows]
        batch = self.processor(
            images=images, text=[""] * len(rows), suffix=captions, max_caption_length=self.max_caption_length
        )
        if lost:
            batch["lost_images"] = lost
        if images is None:
            batch["vision_embeds"] = torch.as_tensor(np.stack([row["vision_embeds"] for row in rows]))
        if self.for_generation:
            batch["row_index"] = torch.tensor([row["row_index"] for row in rows])
        return batch


class CaptionEpochCallback(TrainerCallback):
    """Tells the collator which epoch it is batching, for its per-epoch caption draw."""

    def __init__(self, collator: CaptionCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)
