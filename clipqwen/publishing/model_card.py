"""The model card (README.md of the exported folder), written from the run's real values, never by hand."""

import hashlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData
from transformers import GenerationConfig, PretrainedConfig

from ..hub import REVISION_PLACEHOLDER, is_hub_id
from ..training.checkpoints import sha256_of


TEMPLATE = """---
{card_data}
---

# {title}

An image captioner in the transformers format: **{vision}** (image tower, {vision_state}) → **{projector} projector**
({feature_desc}, {num_image_tokens} image token(s)) → **{text}** ({decoder} decoder, {text_state}).
Trained with clipqwen's `run_captioning.py` on **{dataset}**{dataset_detail}.

## Results

Captions generated with {generation} (this repository's `generation_config.json`, so a bare `generate()` or the
pipeline decodes the same way) on the {split_desc}, scored against all references with clipqwen's
`evaluate` module `caption_metrics` (`evaluate.load("clipqwen/caption_metrics")` from the clipqwen repository).
ROUGE-L is `rouge_score`'s F-measure against the best-matching reference (COCO's ROUGE-L differs); BLEU-1..4 and
CIDEr-D are pycocoevalcap's scorers on lower-cased, punctuation-free tokens (no METEOR: it needs Java or a WordNet
download). Whether the model looks at the image: *image reliance* is the loss with each caption's image swapped for
another photo's minus the true loss (nats per token; near 0: the image is ignored), and *distinct* is the
share of generated captions that differ (near 0: one sentence for every photo).

| split | images | {metric_headers} |
|---|---|{metric_rules}
{metrics_rows}

{curves}

## Usage

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

repo = "{repo_id}"
revision = "{revision}"  # pin the commit you reviewed: trust_remote_code runs this repository's .py files
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, revision=revision)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True, revision=revision)

inputs = processor(images=[Image.open("photo.jpg")])
# decodes as generation_config.json says ({generation}); keyword arguments override it
ids = model.generate(**inputs)
print(processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:]))
```

`trust_remote_code=True` is needed because the architecture ships with the weights
(`configuration_clipqwen.py`, `modeling_clipqwen.py`, `processing_clipqwen.py`); read them and pin `revision`.
{demo}
## Training

| hyper-parameter | value |
|---|---|
{hyper_rows}

Trainable parameters: {trainable:,} of {total:,}.

{phases}

Framework versions: {versions}.
"""


def phase_table(phases: dict) -> str:
    rows = "\n".join(
        f"| {name} | {values['seconds']} | "
        + (f"{values['per_second']} {values['unit']}/s |" if "per_second" in values else "– |")
        for name, values in phases.items()
    )
    return (
        "Where the time went (wall clock, `time_*` in all_results.json; training throughput counts the "
        "image-caption pairs it trained on; the export and the push came after this card was written):\n\n"
        "| phase | seconds | throughput |\n|---|---|---|\n" + rows
    )


def content_sha256(paths) -> str:
    """The identity of local data, which has no Hub revision: one SHA-256 over each given file's (for a folder,
    each file under it) path and SHA-256."""
    digest = hashlib.sha256()
    for path in map(Path, paths):  # named relative to what was given: the same files hash the same anywhere
        files = sorted(file for file in path.rglob("*") if file.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(
                f"{path.name}/{file.relative_to(path).as_posix() if path.is_dir() else ''} "
                f"{sha256_of(file)}\n".encode()
            )
    return digest.hexdigest()


# The generation_config fields that decide how a caption is decoded (the others are token ids and output switches).
DECODING_FIELDS = (
    "do_sample",
    "num_beams",
    "max_new_tokens",
    "min_new_tokens",
    "max_length",
    "min_length",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "early_stopping",
)


def decoding_settings(generation_config: GenerationConfig) -> str:
    """The decoding a generation_config sets, as keyword arguments ("greedy decoding" when it sets none)."""
    settings = [(name, getattr(generation_config, name, None)) for name in DECODING_FIELDS]
    return ", ".join(f"{name}={value}" for name, value in settings if value is not None) or "greedy decoding"


# The results table's columns after the image count: metric key (eval_*/test_* in all_results.json), header.
RESULT_COLUMNS = (
    ("bleu1", "BLEU-1"),
    ("bleu2", "BLEU-2"),
    ("bleu3", "BLEU-3"),
    ("bleu4", "BLEU-4"),
    ("cider", "CIDEr-D"),
    ("rougeL", "ROUGE-L"),
    ("loss", "loss"),
    ("image_reliance", "image reliance"),
    ("distinct_captions", "distinct"),
)


def _fmt(value, digits=4):
    return f"{value:.{digits}f}" if isinstance(value, float) else ("–" if value is None else str(value))


@dataclass
class CardFacts:
    """What a model card states about one run. `metrics`: Trainer-style eval_* / test_* keys (num_images and
    RESULT_COLUMNS' keys); `generation_config`: the saved one, the only source of the decoding the card names;
    `revision` stays a placeholder until clipqwen.hub.push_export pins the pushed commit."""

    repo_id: str
    vision_id: str
    text_id: str
    dataset_name: str
    model_config: PretrainedConfig
    generation_config: GenerationConfig
    metrics: dict
    hyperparameters: dict
    trainable: int
    total: int
    dataset_revision: str | None = None
    dataset_detail: str = ""
    versions: dict | None = None
    phases: dict | None = None
    curves_png: str | None = None
    samples_png: str | None = None
    revision: str = REVISION_PLACEHOLDER
    has_demo: bool = False
    license: str = "apache-2.0"
    vision_frozen: bool = True
    language_frozen: bool = True


def results_rows(metrics: dict) -> list[str]:
    """The results table's rows: validation, then test, for each split the metrics have."""
    rows = []
    for prefix, name in (("eval", "validation"), ("test", "test")):
        if any(f"{prefix}_{key}" in metrics for key, _ in RESULT_COLUMNS):
            values = [metrics.get(f"{prefix}_{key}") for key in ("num_images", *dict(RESULT_COLUMNS))]
            rows.append(f"| {name} | " + " | ".join(_fmt(value) for value in values) + " |")
    return rows


def card_metadata(facts: CardFacts) -> str:
    """The card's YAML header: the Hub's model card data, and a model-index with the scores of each split."""
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=facts.license,
        # Hub ids only: a tiny randomly initialised test model has no base model to link to.
        base_model=[model_id for model_id in (facts.vision_id, facts.text_id) if is_hub_id(model_id)] or None,
        datasets=[facts.dataset_name] if is_hub_id(facts.dataset_name) else None,
        tags=["image-captioning", "clip", "qwen3", "clipqwen", "custom_code"],
        metrics=["rouge", "bleu", "cider"],
        model_name=facts.repo_id,
        eval_results=None,
    )
    results = [
        {
            "task": {"type": "image-to-text", "name": "Image captioning"},
            "dataset": {
                "name": facts.dataset_name,
                "type": facts.dataset_name,
                "split": "test" if prefix == "test" else "validation",
                **({"revision": facts.dataset_revision} if facts.dataset_revision else {}),
            },
            # metric types the Hub knows (its metric ids), with the exact variant in the readable name
            "metrics": [
                {"type": hub_type, "value": round(float(facts.metrics[f"{prefix}_{key}"]), 4), "name": label}
                for key, hub_type, label in (
                    ("rougeL", "rouge", "ROUGE-L (rouge_score F)"),
                    ("bleu4", "bleu", "BLEU-4"),
                    ("cider", "cider", "CIDEr-D"),
                )
                if f"{prefix}_{key}" in facts.metrics
            ],
        }
        for prefix in ("eval", "test")
        if f"{prefix}_rougeL" in facts.metrics
    ]
    metadata = card_data.to_yaml()
    if results:
        model_index = {"model-index": [{"name": facts.repo_id, "results": results}]}
        metadata += "\n" + yaml.safe_dump(model_index, sort_keys=False).strip()
    return metadata


def build_model_card(facts: CardFacts) -> ModelCard:
    """The model card of one run, from its facts."""
    config = facts.model_config
    figures = (("Loss and metric curves", facts.curves_png), ("Sample captions", facts.samples_png))
    feature_desc = {
        "pooled": "the pooled image embedding",
        "patch": f"one token per feature-map position of layer {config.vision_feature_layer}",
        "grid": f"the whole image's feature and a {config.vision_grid_size}×{config.vision_grid_size} grid of "
        f"the feature map's cell means (layer {config.vision_feature_layer})",
    }[config.vision_feature_type]
    rows = results_rows(facts.metrics)
    text = TEMPLATE.format(
        card_data=card_metadata(facts),
        title=facts.repo_id.split("/")[-1],
        vision=facts.vision_id,
        text=facts.text_id,
        vision_state="frozen" if facts.vision_frozen else "fine-tuned",
        text_state="frozen" if facts.language_frozen else "fine-tuned",
        projector=config.projector_type,
        feature_desc=feature_desc,
        num_image_tokens=config.num_image_tokens,
        decoder=config.text_config.model_type,
        dataset=facts.dataset_name,
        dataset_detail=facts.dataset_detail,
        generation=decoding_settings(facts.generation_config),
        split_desc="validation and test splits",
        metric_headers=" | ".join(header for _, header in RESULT_COLUMNS),
        metric_rules="---|" * len(RESULT_COLUMNS),
        metrics_rows="\n".join(rows) or "| " + " | ".join("–" * (len(RESULT_COLUMNS) + 2)) + " |",
        curves="\n\n".join(f"![{alt}]({png})" for alt, png in figures if png),
        repo_id=facts.repo_id,
        revision=facts.revision,
        demo="\nA Gradio demo (`app.py` in the clipqwen repository) runs this model in the browser: "
        f"`python app.py {facts.repo_id}`.\n"
        if facts.has_demo
        else "",
        hyper_rows="\n".join(f"| {k} | {v} |" for k, v in facts.hyperparameters.items()),
        trainable=facts.trainable,
        total=facts.total,
        versions=", ".join(f"{name} {version}" for name, version in (facts.versions or {}).items()) or "not recorded",
        phases=phase_table(facts.phases) if facts.phases else "",
    )
    return ModelCard(text)


def parameter_counts(model) -> dict[str, int]:
    """What trained, of the whole model while it trained (with LoRA: before merging)."""
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }


def describe_data(data_args) -> str:
    """Which version of the data: the Hub commit, or for local data the content hash of the files and folders given
    (an annotation file's, not the images it names); the generated set (`embedded`) has neither."""
    local = data_args.local_data
    if local:
        version = f" (SHA-256 of {', '.join(Path(path).name for path in local)}: `{content_sha256(local)}`)"
    elif data_args.on_hub and data_args.dataset_revision:
        version = f" at commit `{data_args.dataset_revision}`"
    else:
        version = ""
    splits = (
        f", splits from its `{data_args.split_column}` column (train / val / test → train / validation / test)"
        if data_args.split_column and not data_args.local_files
        else ""
    )
    return version + splits


def describe_training(trainer, model_args, data_args) -> dict:
    """The hyper-parameters as they ran: real steps and epochs, the precision Accelerate used, the total batch."""
    args, state = trainer.args, trainer.state
    warmup = args.warmup_steps
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    optimizer = getattr(args.optim, "value", args.optim)
    return {
        "learning rate": args.learning_rate,
        "optimizer": f"{optimizer} (betas {args.adam_beta1}, {args.adam_beta2}; eps {args.adam_epsilon})",
        "weight decay": args.weight_decay,
        "scheduler": scheduler,
        "warm-up": f"{warmup:.0%} of the steps" if 0 < warmup < 1 else f"{int(warmup)} steps",
        "optimizer steps": state.global_step,
        "epochs": round(state.epoch or 0, 2),
        "batch size per device": args.per_device_train_batch_size,
        "devices": args.world_size,
        "gradient accumulation": args.gradient_accumulation_steps,
        "total batch size": args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
        "precision": {"no": "fp32"}.get(trainer.accelerator.mixed_precision, trainer.accelerator.mixed_precision),
        "caption mode": data_args.caption_mode,
        "batches": getattr(args.train_sampling_strategy, "value", args.train_sampling_strategy),
        "max caption tokens": data_args.max_caption_length,
        "LoRA": (
            f"r={model_args.lora_r}, alpha={model_args.lora_alpha}, on {model_args.lora_target_modules}"
            if model_args.lora_r
            else "off"
        ),
        "seed": args.seed,
    }


def framework_versions() -> dict:
    versions = {}
    for name in ("clipqwen", "transformers", "torch", "accelerate", "datasets", "peft", "evaluate", "huggingface_hub"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions
