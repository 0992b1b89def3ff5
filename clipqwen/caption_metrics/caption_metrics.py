"""Caption metrics: ROUGE-L, BLEU-1..4 and CIDEr-D of generated captions against all references of each image.

A self-contained `evaluate` module, so anyone can score captions as clipqwen's model cards do:

    import evaluate
    metric = evaluate.load("path/to/clipqwen/caption_metrics")   # this folder; works offline
    metric.compute(predictions=["a dog runs"], references=[["a dog is running", "a brown dog runs"]])

``rougeL`` is ``rouge_score``'s F-measure (beta=1) against the best-matching reference, not COCO's
ROUGE-L (beta=1.2, all references). ``bleu1`` .. ``bleu4`` (corpus BLEU-n, the columns of the 2015
captioning papers' tables) and ``cider`` (CIDEr-D; idf from the scored corpus, so one image alone
scores 0) are pycocoevalcap's; ``gen_len`` is tokens per prediction; ``distinct_captions`` is the
number of different predictions (once tokenised) over the number of predictions: 1.0 when no caption
repeats, near 0 for a model that writes the same few sentences for every photo (it ignores the image). All share
:func:`tokenize_caption`: unlike PTBTokenizer it needs no Java, unlike rouge_score's it keeps
non-ASCII scripts.

No METEOR: the reference implementation (METEOR 1.5, what coco-caption and the papers report) is Java,
and nltk's re-implementation needs the WordNet corpus, which nltk downloads from GitHub at run time
(no PyPI package ships it: `wn` downloads its data too) and which scores differently from METEOR 1.5
(no paraphrase table), so its numbers would not sit beside the papers' anyway.
"""

import unicodedata

import datasets
import evaluate
import regex  # a transformers dependency; unlike `re`, it knows Unicode scripts and combining marks
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from rouge_score.rouge_scorer import RougeScorer


# Chinese/Japanese write no spaces between words, so each ideograph or kana is one token (as BERT does).
_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]")
# A word is a run of letters, combining marks (Arabic vowels, Devanagari matras) and digits; each emoji is a
# token of its own; everything else (punctuation, spaces, other symbols) separates tokens and is dropped.
_TOKEN = regex.compile(r"[\p{L}\p{M}\p{N}]+|\p{Extended_Pictographic}")


def tokenize_caption(text: str) -> list[str]:
    """Lowercased word tokens of a caption in any script.

    "A cat, 在桌子上! 🐱" -> [a, cat, 在, 桌, 子, 上, 🐱]
    """
    # NFKC folds full-width letters and composed/decomposed accents into one spelling before comparing.
    text = unicodedata.normalize("NFKC", text).lower()
    return _TOKEN.findall(_CJK.sub(r" \g<0> ", text))


class CaptionTokenizer:
    """The object rouge_score's ``RougeScorer(tokenizer=...)`` expects."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize_caption(text)


def compute_caption_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Score one generated caption per image against that image's reference captions (one or more)."""
    if len(predictions) == 0:
        raise ValueError("compute_caption_metrics needs at least one prediction, got an empty list")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists")
    for i, refs in enumerate(references):
        # A list of strings, not a bare string (which would be read as one reference per character).
        if isinstance(refs, str) or not any(tokenize_caption(r) for r in refs):
            raise ValueError(f"references[{i}] must be a non-empty list of non-empty captions, got {refs!r}")

    rouge = RougeScorer(["rougeL"], tokenizer=CaptionTokenizer())
    rouge_l = [rouge.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]

    # The COCO scorers split on spaces: hand them our tokens joined by single spaces.
    res = {i: [" ".join(tokenize_caption(p))] for i, p in enumerate(predictions)}
    gts = {i: [" ".join(tokenize_caption(r)) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=0: the default prints corpus counts
    cider, _ = Cider().compute_score(gts, res)

    return {
        "rougeL": float(sum(rouge_l) / len(rouge_l)),
        **{f"bleu{n}": float(bleu[n - 1]) for n in (1, 2, 3, 4)},
        "cider": float(cider),
        "gen_len": sum(len(tokenize_caption(p)) for p in predictions) / len(predictions),
        "distinct_captions": len(set(res_caption for (res_caption,) in res.values())) / len(predictions),
    }


class CaptionMetrics(evaluate.Metric):
    """`evaluate` wrapper of :func:`compute_caption_metrics`: one prediction and a list of references per image."""

    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Lin 2004 (ROUGE); Papineni et al. 2002 (BLEU); Vedantam et al. 2015 (CIDEr)",
            inputs_description="predictions: list of str; references: list of lists of str (all references per image)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=[
                "https://github.com/google-research/google-research/tree/master/rouge",
                "https://github.com/salaniz/pycocoevalcap",
            ],
        )

    def _compute(self, predictions, references):
        return compute_caption_metrics(predictions, references)
