"""The validation loss pass: what CaptionTrainer's evaluation costs against the bare forwards it must run.

    python benchmarks/bench_eval_loss.py --images 100          # 500 pairs of Flickr8k val captions, batch 64

The model is the Flickr8k recipe's shape (configs/flickr8k.json: a SmolLM2-135M decoder, mlp2x_gelu projector,
8 pooled image tokens after "Image:") with random weights; its tokenizer is SmolLM2's when the converted folder
of scripts/flickr8k.sh is in the cache (else the bundled Qwen3 one). Image features are random: a loss pass reads
cached features, so the image tower costs nothing here, as in the recipe. Captions are the real ones, five per
photo, so the padding is the recipe's. Reported, in seconds for the pairs given (docs/benchmarks.md):

- `forward`: the model's forward with labels over pre-collated batches in the data set's order (five captions of a
  photo after each other), no gradients: what the pass cost at least before it sorted its pairs;
- `forward_sorted`: the same, longest caption first (what CaptionTrainer does now): what one pass must cost;
- `collate`: the collator alone over the batches;
- `trainer_evaluate`: transformers' own `Trainer.evaluate()` over the pairs in the data set's order, what
  CaptionTrainer's loss pass was until 2026-12-07 (Trainer's prediction_step after the lost-image check);
- `evaluate`: `CaptionTrainer.evaluate()` now: the loss and the image reliance (a second forward per batch).

The measurements alternate, round after round, so that each round's figures share the machine's load; each
figure is the best of `--rounds`.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from clipqwen.backbones.assemble import match_processor, tower_image_processor  # noqa: E402
from clipqwen.data.cleaning import add_caption_lengths  # noqa: E402
from clipqwen.data.collator import CaptionCollator  # noqa: E402
from clipqwen.hub import clipqwen_cache_dir  # noqa: E402
from clipqwen.tiny import bundled_processor, tiny_config  # noqa: E402
from clipqwen.training.freezing import freeze_backbones  # noqa: E402
from clipqwen.training.trainer import CaptionTrainer  # noqa: E402
from modeling_clipqwen import ClipQwenForConditionalGeneration  # noqa: E402
from processing_clipqwen import ClipQwenProcessor  # noqa: E402


FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"
SMOLLM2 = clipqwen_cache_dir() / "converted" / "smollm2-135m"
SMOLLM2_TEXT = dict(  # SmolLM2-135M's config.json
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def model_and_processor():
    layout = dict(projector_type="mlp2x_gelu", vision_feature_type="pooled", num_pooled_image_tokens=8)
    if (SMOLLM2 / "tokenizer.json").exists():
        config = tiny_config(text_config=SMOLLM2_TEXT, image_token_id=None, **layout)
        tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
        processor = ClipQwenProcessor(tower_image_processor(), tokenizer, num_image_tokens=config.num_image_tokens)
    else:
        qwen = dict(SMOLLM2_TEXT, model_type="qwen3", vocab_size=151936, bos_token_id=151643, eos_token_id=151643)
        config = tiny_config(text_config=qwen | {"pad_token_id": 151643}, **layout)
        processor = bundled_processor(num_image_tokens=config.num_image_tokens)
    processor.prompt = "Image:<|image_pad|>"
    torch.manual_seed(0)
    model = ClipQwenForConditionalGeneration(config)
    return freeze_backbones(match_processor(model, processor)), processor


def caption_pairs(images: int, feature_size: int) -> datasets.Dataset:
    """Five real caption pairs per Flickr8k val photo, each with random (seeded) image features."""
    files = sorted(str(path) for path in FLICKR8K.glob("*.parquet"))
    rows = datasets.Dataset.from_parquet(files).select_columns(["caption", "split", "filename"])
    rows = rows.filter(lambda split: split == "val", input_columns="split").select(range(images))
    features = np.random.default_rng(0).standard_normal((images, feature_size), dtype=np.float32)
    pairs = {"image_id": [], "caption": [], "vision_embeds": []}
    for row, embeds in zip(rows, features):
        for caption in row["caption"]:
            pairs["image_id"].append(row["filename"])
            pairs["caption"].append(caption)
            pairs["vision_embeds"].append(embeds)
    # as the feature cache hands them over
    return datasets.Dataset.from_dict(pairs).with_format("numpy", columns=["vision_embeds"], output_all_columns=True)


def sorted_batches(pairs: datasets.Dataset, batch_size: int, longest_first: bool) -> list[list[dict]]:
    """The rows of each evaluation batch: in the data set's order, or longest caption first."""
    order = list(range(len(pairs)))
    if longest_first:
        order = torch.as_tensor(pairs.with_format(None)["length"]).argsort(descending=True, stable=True).tolist()
    rows = [pairs[i] for i in order]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="Flickr8k val photos (five pairs each)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="each measurement is the best of this many")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    model, processor = model_and_processor()
    model.eval()
    feature_size = model.config.vision_config.projection_dim
    pairs = caption_pairs(args.images, feature_size)
    pairs = add_caption_lengths(pairs, processor.tokenizer)
    collator = CaptionCollator(processor, max_caption_length=32)
    batches = sorted_batches(pairs, args.batch_size, longest_first=False)

    def collate():
        return [collator(rows) for rows in batches]

    collated = collate()
    collated_sorted = [collator(rows) for rows in sorted_batches(pairs, args.batch_size, longest_first=True)]

    def forward(batches):
        with torch.inference_mode():
            for batch in batches:
                model(**batch)

    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_eval_batch_size=args.batch_size,
            remove_unused_columns=False,
            label_names=["labels"],
            report_to="none",
            use_cpu=True,
            dataloader_pin_memory=False,
        )
        trainer = CaptionTrainer(model=model, args=training_args, eval_dataset=pairs, data_collator=collator)
        stock = Trainer(
            model=model,
            args=training_args,
            eval_dataset=pairs.remove_columns("length"),
            data_collator=collator,
        )
        results = {}
        runs = {
            "collate": collate,
            "forward": lambda: forward(collated),
            "forward_sorted": lambda: forward(collated_sorted),
            "trainer_evaluate": lambda: results.update(trainer_evaluate=stock.evaluate()),
            "evaluate": lambda: results.update(evaluate=trainer.evaluate()),
        }
        rounds = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                rounds[name].append(round(time.perf_counter() - start, 2))
        timings = {name: min(seconds) for name, seconds in rounds.items()}
        timings["rounds"] = rounds
    tokens = sum(int((batch["labels"] != -100).sum()) for batch in collated)
    padded = sum(batch["input_ids"].numel() for batch in collated)
    padded_sorted = sum(batch["input_ids"].numel() for batch in collated_sorted)
    print(
        json.dumps(
            {
                "pairs": len(pairs),
                "batch_size": args.batch_size,
                "threads": args.threads,
                "decoder": "SmolLM2-135M shape, random weights",
                "supervised_tokens": tokens,
                "positions": padded,
                "positions_sorted": padded_sorted,
                "real_positions": sum(int(batch["attention_mask"].sum()) for batch in collated),
                "seconds": timings,
                "metrics": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
