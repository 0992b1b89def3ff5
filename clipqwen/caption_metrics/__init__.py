"""The caption metric (ROUGE-L, BLEU-1..4, CIDEr-D, distinct captions) as clipqwen uses it: the `evaluate` module
in caption_metrics/, loaded from this package (no Hub access), so a user who loads the same module gets the same
numbers."""

from pathlib import Path

import evaluate

from .caption_metrics import compute_caption_metrics, tokenize_caption


CAPTION_METRIC_PATH = str(Path(__file__).parent)

__all__ = ["CAPTION_METRIC_PATH", "compute_caption_metrics", "load_caption_metric", "tokenize_caption"]


def load_caption_metric() -> evaluate.EvaluationModule:
    # in memory: several processes (DDP) computing at once must not share evaluate's cache files
    return evaluate.load(CAPTION_METRIC_PATH, keep_in_memory=True)
