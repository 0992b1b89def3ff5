"""Image reliance: how much a captioner uses the image, measured in the evaluation's loss pass.

Each caption is scored with its own image, and every fifth caption of a batch once more with another image of the
batch (a fixed derangement); the second loss minus the first, over the same supervised tokens, is the reliance in
nats per token. A fifth keeps the estimate steady (1,000 pairs of Flickr8k's val) at a fifth of a second loss
pass. A model that ignores the image scores both the same: the reliance stays near zero, as it did for the
seed_exact layout on Flickr8k (docs/flickr8k.md) while its loss fell like everyone's.
"""

import torch
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)


# Below this many nats per token, a run's captions barely depend on the image. The Flickr8k recipe's model
# loses far more with another photo's features, and a model whose image path is frozen, too slow to learn or
# ignored (seed_exact's one token in the attention sink) stays within a few hundredths of zero.
MIN_IMAGE_RELIANCE = 0.05

LOW_RELIANCE_CAUSES = (
    "the layout (one image token first, as in --preset seed_exact, sits in the decoder's attention sink and is "
    "ignored: use the default clipcap preset), a learning rate too low or too few steps for the projector to learn "
    "(--learning_rate, --num_train_epochs), or an image path that does not train (a projector frozen by hand, "
    "features that are all alike, e.g. zeros from unreadable images)"
)


def image_inputs_key(inputs: dict) -> str:
    return "vision_embeds" if inputs.get("vision_embeds") is not None else "pixel_values"


def derangement(images: torch.Tensor) -> torch.Tensor | None:
    """For each row, the index of a row whose image differs: the batch's distinct images each take the next
    one's (in the order they first appear), so no row keeps its own image even where one image has several
    captions in the batch. None when the batch holds a single image."""
    _, image_of_row = torch.unique(images.flatten(1), dim=0, return_inverse=True)
    rows = torch.arange(len(images), device=images.device)
    count = int(image_of_row.max()) + 1
    if count < 2:
        return None
    first_row = torch.full((count,), len(images), device=images.device).scatter_reduce(
        0, image_of_row, rows, reduce="amin"
    )
    order = first_row.argsort()  # distinct images in the order they first appear
    rank = torch.empty_like(order)
    rank[order] = torch.arange(count, device=images.device)
    return first_row[order[(rank[image_of_row] + 1) % count]]


def caption_nats(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the cross-entropy summed over its supervised tokens (nats) and their number: the model's loss is
    the ratio of their sums. The LM head runs only at supervised positions, as in the model's own loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA stays applied
    labels = inputs["labels"]
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    hidden_states = base.model(**model_inputs, use_cache=False).last_hidden_state
    shift_labels = labels[:, 1:].to(hidden_states.device)
    supervised = (shift_labels != -100) & (shift_labels != base.config.image_token_id)
    logits = base.lm_head(hidden_states[:, :-1][supervised]).float()
    nats = nn.functional.cross_entropy(logits, shift_labels[supervised], reduction="none")
    rows = supervised.nonzero()[:, 0]  # each supervised token's row, in the boolean index's (row-major) order
    per_row = torch.zeros(len(labels), device=nats.device).index_add_(0, rows, nats)
    return per_row, supervised.sum(1)


class RelianceMeter:
    """Sums over an evaluation: nats with the true and with another row's image, tokens, and the rows that had
    another image. Rows 0, `every`, 2 `every`, ... of each batch are scored with another image. A batch of one image
    takes the last image seen in an earlier batch; a row with no other image at all (the first batch holds one
    image) is left out of the reliance, not of the loss."""

    def __init__(self, every: int = 5):
        self.every = every
        self.spare = None  # one image of an earlier batch
        # nats and tokens of all rows; nats (true, deranged) and tokens of the rows scored with another image; the
        # rows due that had none
        self.sums = dict.fromkeys(
            ("nats", "tokens", "reliant_nats", "deranged_nats", "reliant_tokens", "skipped"), 0.0
        )

    def rows(self, model, inputs: dict) -> torch.Tensor:
        """Per row of this batch: [true nats, deranged nats (0 where not scored with another image), tokens,
        1 where it was, 1 where it was due but had no other image]."""
        key = image_inputs_key(inputs)
        images = inputs[key]
        true_nats, tokens = caption_nats(model, inputs)
        source = derangement(images)
        if source is not None:
            other = images[source]
        elif self.spare is not None and not torch.equal(self.spare[0], images[0]):
            other = self.spare.expand_as(images)
        else:
            other = None
        self.spare = images[-1:].clone()
        due = torch.arange(0, len(images), self.every, device=true_nats.device)
        deranged, reliant, skipped = torch.zeros(3, *true_nats.shape, dtype=true_nats.dtype, device=true_nats.device)
        if other is None:
            skipped[due] = 1.0
        else:
            inputs = {**inputs, key: other}
            due_rows = {
                name: v[due] if torch.is_tensor(v) and v.dim() and len(v) == len(images) else v
                for name, v in inputs.items()
            }
            deranged[due], _ = caption_nats(model, due_rows)
            reliant[due] = 1.0
        return torch.stack([true_nats, deranged, tokens.to(true_nats.dtype), reliant, skipped], dim=1)

    def add(self, rows: torch.Tensor):
        """Rows as `rows` returns them, gathered over processes."""
        true, deranged, tokens, reliant, skipped = rows.detach().double().cpu().unbind(1)
        for key, value in (
            ("nats", true),
            ("tokens", tokens),
            ("reliant_nats", true * reliant),
            ("deranged_nats", deranged * reliant),
            ("reliant_tokens", tokens * reliant),
            ("skipped", skipped),
        ):
            self.sums[key] += float(value.sum())

    def metrics(self) -> dict:
        """`loss`: nats per supervised token over the split; `image_reliance`: the deranged loss minus the true
        one, nats per token (absent when no row had another image)."""
        sums = self.sums
        out = {"loss": sums["nats"] / max(sums["tokens"], 1)}
        if sums["reliant_tokens"]:
            out["image_reliance"] = (sums["deranged_nats"] - sums["reliant_nats"]) / sums["reliant_tokens"]
        return out


def warn_if_image_ignored(metrics: dict, prefix: str = "eval") -> bool:
    """At the end of a run: a warning naming the likely causes when `{prefix}_image_reliance` is below
    MIN_IMAGE_RELIANCE. True when it warned."""
    reliance = metrics.get(f"{prefix}_image_reliance")
    if reliance is None or reliance >= MIN_IMAGE_RELIANCE:
        return False
    distinct = metrics.get(f"{prefix}_distinct_captions")
    logger.warning(
        "The model barely uses the image: swapping each caption's image for another photo's raises the %s loss by "
        "only %.4f nats per token (below %s)%s. Its captions follow the language model's prior, not the photo. "
        "Likely causes: %s.",
        prefix,
        reliance,
        MIN_IMAGE_RELIANCE,
        f", and {distinct:.0%} of its captions are distinct" if distinct is not None else "",
        LOW_RELIANCE_CAUSES,
    )
    return True
