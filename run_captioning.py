#!/usr/bin/env python
"""Train, evaluate and publish a ClipQwen image captioner with HF Trainer.

    accelerate launch run_captioning.py --output_dir out --do_train --do_eval --do_predict   # Flickr30K, real backbones
    python run_captioning.py configs/embedded-tiny.json                                      # offline demo, a few CPU minutes

Arguments come as flags or as one JSON file (HfArgumentParser), in the shape of transformers'
examples/pytorch/*/run_*.py. What happens, in order: build or load the model and processor → load the data
into one layout (image_id, image, captions) → drop unreadable images and empty captions → cache the frozen
CLIP features once per image → train with Trainer (resuming from the last checkpoint) → generation-based
evaluation (ROUGE-L, BLEU-4, CIDEr-D) on validation and test → export a self-contained model folder with its
processor, predictions, curves and a model card → optionally push it to the Hub.
"""

import dataclasses
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import transformers
from transformers import HfArgumentParser, TrainerState, TrainingArguments, set_seed
from transformers.utils import is_torch_bf16_gpu_available

from configuration_clipqwen import ADAPTER_TYPES, VISION_FEATURE_TYPES
from clipqwen.timing import PhaseTimer
from modeling_clipqwen import ClipQwenForConditionalGeneration

logger = logging.getLogger("run_captioning")

FLICKR30K = "nlphuji/flickr30k"
RUN_COMPLETE = "run_complete.json"  # written last by export(): the output folder holds a finished run


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A trained clipqwen model (folder or Hub id) to continue from. Without it the model is assembled from the two backbones below."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of --model_name_or_path."})
    vision_model_name_or_path: str = field(default="openai/clip-vit-base-patch32", metadata={"help": "CLIP checkpoint (Hub id or folder) for the vision tower and image processor."})
    vision_model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of --vision_model_name_or_path."})
    text_model_name_or_path: str = field(default="Qwen/Qwen3-0.6B-Base", metadata={"help": "Qwen3 checkpoint (Hub id or folder) for the decoder and tokenizer."})
    text_model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of --text_model_name_or_path."})
    tiny_model: bool = field(default=False, metadata={"help": "Build a tiny randomly initialised model with the bundled Qwen3 tokenizer (offline demo, tests) instead of loading backbones."})
    adapter_type: str = field(default="linear", metadata={"help": f"Adapter: one of {ADAPTER_TYPES} ('linear' is the seed-exact preset)."})
    vision_feature_type: str = field(default="pooled", metadata={"help": f"CLIP features: one of {VISION_FEATURE_TYPES}."})
    num_pooled_image_tokens: int = field(default=1, metadata={"help": "Image tokens made from the pooled embedding (ClipCap-style K)."})
    vision_feature_layer: int = field(default=-2, metadata={"help": "CLIP hidden-state index for --vision_feature_type patch."})
    freeze_vision_model: bool = field(default=True, metadata={"help": "Keep CLIP frozen (enables the feature cache)."})
    freeze_language_model: bool = field(default=True, metadata={"help": "Keep Qwen3 frozen (LoRA still trains its own weights)."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the language model; 0 turns LoRA off."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "Comma-separated Qwen3 module names that get LoRA (language model only, never CLIP)."})
    merge_lora: bool = field(default=True, metadata={"help": "Merge LoRA into the exported model (self-contained folder); the LoRA adapter is also saved in <output_dir>/lora."})
    auto_bf16: bool = field(default=True, metadata={"help": "On a CUDA GPU with bf16 support, train and evaluate in bf16 unless --fp16/--bf16 is given."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data sets are cached."})

    def __post_init__(self):
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"--adapter_type {self.adapter_type!r}: use one of {ADAPTER_TYPES}.")
        if self.vision_feature_type not in VISION_FEATURE_TYPES:
            raise ValueError(f"--vision_feature_type {self.vision_feature_type!r}: use one of {VISION_FEATURE_TYPES}.")
        if self.lora_r < 0 or (self.lora_r and not self.lora_target_modules.strip()):
            raise ValueError("--lora_r must be >= 0, and LoRA needs --lora_target_modules.")
        if self.lora_r and not self.freeze_language_model:
            raise ValueError("LoRA trains a frozen language model: drop --freeze_language_model False or --lora_r.")
        if self.lora_r and not self.freeze_vision_model:
            # peft freezes everything outside LoRA and modules_to_save, and a CLIP in modules_to_save is wrapped twice
            # (its inner `vision_model` matches too): the vision tower would silently stay frozen.
            raise ValueError("--lora_r with --freeze_vision_model False is not supported: LoRA would leave CLIP frozen. "
                             "Fine-tune CLIP without LoRA, or keep --freeze_vision_model True.")


@dataclass
class DataTrainingArguments:
    dataset_name: str = field(default=FLICKR30K, metadata={"help": "Hub data set or local folder of parquet/json files; 'embedded' for the generated offline data set."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Data set configuration."})
    dataset_revision: str | None = field(default="refs/convert/parquet", metadata={"help": "Data set revision; Flickr30K's parquet conversion lives on refs/convert/parquet, a ref that moves when the Hub re-converts: the run resolves it to a commit sha, logs it and writes it into the model card; pass that sha to load exactly the same data."})
    split_column: str | None = field(default="split", metadata={"help": "Column with split names (Flickr30K: Karpathy train/val/test); empty to use the data set's own splits."})
    train_file: str | None = field(default=None, metadata={"help": "JSONL or CSV: an image path column (relative to the file) and a caption column."})
    validation_file: str | None = field(default=None, metadata={"help": "Like --train_file."})
    test_file: str | None = field(default=None, metadata={"help": "Like --train_file."})
    train_dir: str | None = field(default=None, metadata={"help": "imagefolder with metadata.jsonl (file_name + captions)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Like --train_dir."})
    test_dir: str | None = field(default=None, metadata={"help": "Like --train_dir."})
    image_column: str = field(default="image", metadata={"help": "Column with the image (or its path in JSONL/CSV)."})
    caption_column: str = field(default="caption", metadata={"help": "Column with a caption or a list of captions."})
    id_column: str | None = field(default=None, metadata={"help": "Column with an image id used in predictions (default: the `filename` column if there is one, as in Flickr30K, else the file name or row number)."})
    caption_mode: Literal["random", "all"] = field(default="random", metadata={"help": "'random': one random caption per image per epoch; 'all': every caption is its own pair."})
    max_caption_length: int = field(default=64, metadata={"help": "Caption tokens kept (including the end token); longer ones are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation images."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only this many test images."})
    use_feature_cache: bool = field(default=True, metadata={"help": "With a frozen CLIP, compute its features once per image and train from them."})
    feature_cache_dir: str | None = field(default=None, metadata={"help": "Where cached CLIP features go (default: $HF_HOME/clipqwen/features)."})
    check_images: bool = field(default=True, metadata={"help": "Decode every image before training and skip unreadable ones (logged with names)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes that decode and preprocess images: for the CLIP feature cache (decode once, check and encode; the vision tower runs in the main process on their batches) or, without it, for the unreadable-image check. Default: none, the main process does it."})

    def __post_init__(self):
        files = [self.train_file, self.validation_file, self.test_file]
        for path in filter(None, files):
            if Path(path).suffix.lower() not in (".jsonl", ".json", ".csv"):
                raise ValueError(f"{path}: annotation files must be .jsonl or .csv.")
        if self.caption_mode not in ("random", "all"):
            raise ValueError(f"--caption_mode {self.caption_mode!r}: use 'random' or 'all'.")
        if self.max_caption_length < 2:
            raise ValueError("--max_caption_length must be at least 2 (one word and the end token).")
        if self.dataset_revision in ("", "None"):
            self.dataset_revision = None
        if self.dataset_name == "embedded" and self.image_column == "image" and self.caption_column == "caption":
            self.caption_column = "captions"

    @property
    def local_files(self) -> bool:
        """Annotation files or image folders were given: they replace --dataset_name."""
        return any([self.train_file, self.validation_file, self.test_file, self.train_dir, self.validation_dir,
                    self.test_dir])


@dataclass
class CaptioningArguments:
    num_beams: int = field(default=1, metadata={"help": "Beams for evaluation and prediction captions."})
    max_new_tokens: int = field(default=30, metadata={"help": "Longest generated caption, in tokens."})
    prompt: str = field(default="", metadata={"help": "Optional text after the image placeholders, before the caption."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow training into an output folder that holds a finished run."})


def parse_args(argv=None):
    """Flags, or one JSON file of arguments followed by flags that override it
    (`run_captioning.py configs/embedded-tiny.json --output_dir elsewhere`)."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, CaptioningArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith(".json"):
        values = json.loads(Path(argv[0]).read_text())
        known = {f.name for dataclass_type in parser.dataclass_types for f in dataclass_type.__dataclass_fields__.values()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{argv[0]}: unknown argument(s) {unknown}; see run_captioning.py --help.")
        argv = [item for key, value in values.items() for item in (f"--{key}", _flag_value(value))] + argv[1:]
    model_args, data_args, caption_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, caption_args, choose_precision(model_args, training_args)


def choose_precision(model_args, training_args: TrainingArguments) -> TrainingArguments:
    """bf16 on CUDA GPUs that support it, unless --fp16/--bf16/--use_cpu says otherwise. TrainingArguments fixes
    Accelerate's mixed precision when it is built, so the choice is made by building them again, not by setting
    `.bf16` afterwards (which would leave the run in fp32 while reporting bf16)."""
    if (model_args.auto_bf16 and not (training_args.fp16 or training_args.bf16 or training_args.use_cpu)
            and is_torch_bf16_gpu_available()):
        training_args = dataclasses.replace(training_args, bf16=True)
    return training_args


def _flag_value(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


# ---- model -----------------------------------------------------------------------------------------------
def build_model_and_processor(args: ModelArguments):
    from clipqwen import hub
    from clipqwen.loading import ModelLoadError

    settings = dict(adapter_type=args.adapter_type, vision_feature_type=args.vision_feature_type,
                    num_pooled_image_tokens=args.num_pooled_image_tokens, vision_feature_layer=args.vision_feature_layer,
                    freeze_vision_model=args.freeze_vision_model, freeze_language_model=args.freeze_language_model)
    if not args.tiny_model:  # an unreachable Hub fails in a second, not after ~25 s of retries per file
        hub.go_offline_if_hub_unreachable([args.model_name_or_path] if args.model_name_or_path else
                                          [args.vision_model_name_or_path, args.text_model_name_or_path])
    try:
        if args.model_name_or_path:
            # clipqwen only, built from the installed classes (never the code shipped with the weights), safetensors only
            from clipqwen.loading import load_clipqwen

            model, processor = load_clipqwen(args.model_name_or_path, args.model_revision, cache_dir=args.cache_dir)
            model.config.freeze_vision_model, model.config.freeze_language_model = args.freeze_vision_model, args.freeze_language_model
            model.apply_freezing().train()
        elif args.tiny_model:
            from clipqwen.presets import bundled_processor, tiny_config

            model = ClipQwenForConditionalGeneration(tiny_config(**settings))
            processor = bundled_processor(num_image_tokens=model.config.num_image_tokens)
        else:
            from transformers import AutoTokenizer

            from clipqwen.presets import clip_image_processor
            from processing_clipqwen import ClipQwenProcessor

            model = ClipQwenForConditionalGeneration.from_pretrained_backbones(
                args.vision_model_name_or_path, args.text_model_name_or_path, vision_revision=args.vision_model_revision,
                text_revision=args.text_model_revision, cache_dir=args.cache_dir, **settings)
            image_processor = clip_image_processor(args.vision_model_name_or_path, revision=args.vision_model_revision,
                                                   cache_dir=args.cache_dir)
            tokenizer = AutoTokenizer.from_pretrained(args.text_model_name_or_path, revision=args.text_model_revision,
                                                      cache_dir=args.cache_dir)
            processor = ClipQwenProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens)
    except (OSError, ModelLoadError) as error:
        if isinstance(error, ModelLoadError) and not isinstance(error.__cause__, OSError):
            raise  # not a download problem: the message says what is wrong with the model
        raise SystemExit(
            f"Could not load the model: {error}\nWithout access to the Hugging Face Hub, pass local folders "
            "(--model_name_or_path, or --vision_model_name_or_path and --text_model_name_or_path), set "
            "HF_HUB_OFFLINE=1 to use the local cache, or use --tiny_model for the offline demo."
        ) from error
    # placeholder count and id, end and pad tokens as the processor writes them (a no-op for Qwen3; another decoder's
    # tokenizer gets its placeholder token added by the processor, and the model one frozen embedding row)
    model.match_processor(processor)
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        targets = "|".join(name.strip() for name in args.lora_target_modules.split(","))
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          # a regex, so that CLIP's q_proj/v_proj are never wrapped
                          target_modules=rf"language_model\.model\.layers\.\d+\..*\.({targets})",
                          modules_to_save=["adapter"])
        model = get_peft_model(model, lora)
    return model, processor


def describe_backbones(args: ModelArguments, config) -> tuple[str, str]:
    """Where the vision and text weights came from, for the model card."""
    if args.tiny_model:
        return "tiny random CLIP (test size)", "tiny random Qwen3 (test size)"
    return (getattr(config.vision_config, "_name_or_path", "") or args.vision_model_name_or_path,
            getattr(config.text_config, "_name_or_path", "") or args.text_model_name_or_path)


# ---- data ------------------------------------------------------------------------------------------------
def add_features(splits, samples, data_args, training_args, base, processor, timer):
    """CLIP features for every split, each image decoded once (the feature pass is also the unreadable-image check),
    by `--preprocessing_num_workers` processes. Under DDP every rank encodes its own shard of the rows, and
    `add_vision_features` waits for all of them before every rank reads the merged cache."""
    from clipqwen.data import add_vision_features
    from clipqwen.presets import clipqwen_cache_dir

    shown = splits.get("test") or splits.get("validation")  # with its images, before features replace them
    cache_dir = data_args.feature_cache_dir or clipqwen_cache_dir() / "features"
    barrier = None
    if training_args.world_size > 1:
        import torch.distributed as dist

        barrier = dist.barrier
    with timer.phase("feature cache", items=sum(len(dataset) for dataset in splits.values())):
        base.vision_model.to(training_args.device)
        for split in splits:
            splits[split] = add_vision_features(
                splits[split], base, processor, cache_dir, training_args.per_device_eval_batch_size * 4, split=split,
                num_workers=data_args.preprocessing_num_workers, drop_unreadable=data_args.check_images,
                rank=training_args.process_index, world_size=training_args.world_size, barrier=barrier)
        base.vision_model.to("cpu")  # Trainer moves the whole model later; this keeps devices consistent
    if shown is not None:  # the picture's images: the first readable ones (decoded again: at most 8 images)
        kept = set(splits["test" if "test" in splits else "validation"]["image_id"])
        indices = [i for i, image_id in enumerate(shown["image_id"]) if image_id in kept][:8]
        samples = [(row["image_id"], row["image"]) for row in shown.select(indices)]
    return splits, samples


def load_and_clean(data_args, model_args, training_args, check_images: bool = True):
    """The wanted splits, limited and cleaned, and a few sample images. `check_images=False` leaves the
    unreadable-image check to the feature pass (one decode per image); `--check_images False` turns it off."""
    from clipqwen.data import drop_unreadable_images, load_caption_data, remove_empty_captions

    raw = load_caption_data(data_args, cache_dir=model_args.cache_dir)
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples, "test": data_args.max_predict_samples}
    evaluates_during_training = training_args.do_train and training_args.eval_strategy != "no"
    wanted = {"train": training_args.do_train, "validation": training_args.do_eval or evaluates_during_training,
              "test": training_args.do_predict}
    splits = {}
    for split, dataset in raw.items():
        if not wanted.get(split):
            continue
        if limits[split] is not None:
            dataset = dataset.select(range(min(limits[split], len(dataset))))
        dataset = remove_empty_captions(dataset, split)
        if data_args.check_images and check_images:
            dataset = drop_unreadable_images(dataset, split, data_args.preprocessing_num_workers)
        splits[split] = dataset
    missing = [split for split, needed in wanted.items() if needed and split not in splits]
    if missing:
        raise ValueError(f"The data has no {', '.join(missing)} split; it has {list(raw)}. Give the matching files or "
                         "directories, or drop the corresponding --do_* flag.")

    # A few decoded test (or validation) images for the sample-caption picture, taken before features replace pixels;
    # with the check left to the feature pass, `add_features` takes them after it, from the readable ones.
    shown = splits.get("test") or splits.get("validation")
    samples = ([(row["image_id"], row["image"]) for row in shown.select(range(min(8, len(shown))))]
               if shown and check_images else [])
    return splits, samples


# ---- outputs ---------------------------------------------------------------------------------------------
def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


def export(trainer, model_args, data_args, training_args, processor, metrics, generation_kwargs, sample_images, timer):
    """The folder that is published: complete model, processor, predictions, pictures and model card."""
    from clipqwen.model_card import build_model_card
    from clipqwen.plots import plot_sample_grid, plot_training_curves

    final = Path(training_args.output_dir)
    # Written into a staging folder and moved into place at the end: a failure halfway (a full disk) leaves the
    # last checkpoint and no half export, and the same command then resumes and exports again.
    out = final / f".export-{os.getpid()}.tmp"
    shutil.rmtree(out, ignore_errors=True)
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(model, "merge_and_unload"):  # LoRA
            model.save_pretrained(out / "lora")
            (out / "lora" / "README.md").unlink(missing_ok=True)  # peft's blank template card (base_model: '')
            if model_args.merge_lora:
                model = model.merge_and_unload()
        # The decoding behind the reported scores, so that a bare generate() or the pipeline reproduces them.
        model.generation_config.update(**generation_kwargs)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        for prefix, split in (("eval", "validation"), ("test", "test")):
            if prefix in trainer.predictions:
                write_jsonl(out / f"predictions_{split}.jsonl", trainer.predictions[prefix])
        curves = plot_training_curves(trainer.state.log_history, out / "training_curves.png")
        samples = None
        predictions = trainer.predictions.get("test") or trainer.predictions.get("eval")
        if predictions and sample_images:
            by_id = {row["image_id"]: row for row in predictions}
            shown = [(image, by_id[image_id]) for image_id, image in sample_images if image_id in by_id][:8]
            if shown:
                samples = plot_sample_grid([image for image, _ in shown], [row["caption"] for _, row in shown],
                                           [row["references"] for _, row in shown], out / "sample_captions.png")
        vision_id, text_id = describe_backbones(model_args, model.config)
        local_data = data_args.local_files
        card = build_model_card(
            repo_id=training_args.hub_model_id or final.name, vision_id=vision_id, text_id=text_id,
            dataset_name="local data" if local_data else data_args.dataset_name,
            dataset_revision=None if local_data else data_args.dataset_revision,
            dataset_detail="" if local_data else describe_data(data_args), model_config=model.config, metrics=metrics,
            hyperparameters=describe_training(trainer, model_args, data_args), generation_kwargs=generation_kwargs,
            phases=timer.phases,
            versions=framework_versions(), trainable=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            total=sum(p.numel() for p in model.parameters()), curves_png=curves and curves.name, samples_png=samples and samples.name,
            has_demo=Path(__file__).with_name("app.py").exists(),
        )
        card.save(out / "README.md")
        publish(out, final, step=trainer.state.global_step)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return final


def publish(staging: Path, final: Path, step: int) -> None:
    """Move the staged export into the output folder, config.json last (without it the folder is not a model),
    then mark the run complete."""
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        target = final / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    marker = final / f"{RUN_COMPLETE}.tmp"
    marker.write_text(json.dumps({"global_step": step}))
    os.replace(marker, final / RUN_COMPLETE)


def describe_data(data_args) -> str:
    revision = f" at commit `{data_args.dataset_revision}`" if data_args.dataset_revision else ""
    splits = (f", splits from its `{data_args.split_column}` column (train / val / test → train / validation / test)"
              if data_args.split_column else "")
    return revision + splits


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
        "max caption tokens": data_args.max_caption_length,
        "LoRA": f"r={model_args.lora_r}, alpha={model_args.lora_alpha}, on {model_args.lora_target_modules}" if model_args.lora_r else "off",
        "seed": args.seed,
    }


def framework_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("clipqwen", "transformers", "torch", "accelerate", "datasets", "peft", "evaluate", "huggingface_hub"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


# ---- main ------------------------------------------------------------------------------------------------
def main(args=None):
    model_args, data_args, caption_args, training_args = args if args is not None else parse_args()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    # Our own progress lines (data revision, cache, pushes) at INFO on the main process unless --log_level says otherwise.
    own_level = logging.INFO if training_args.should_log and training_args.log_level == "passive" else log_level
    for library_logger in (logger, logging.getLogger("clipqwen")):
        library_logger.setLevel(own_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning("process rank %s, device %s, n_gpu %s, distributed %s", training_args.process_index,
                   training_args.device, training_args.n_gpu, training_args.parallel_mode.value)

    training_args.remove_unused_columns = False  # the collator needs the image / feature columns
    training_args.label_names = ["labels"]

    from clipqwen import preflight

    preflight.check_arguments(data_args, caption_args, training_args)
    out = Path(training_args.output_dir)
    if not training_args.should_save:  # other ranks: rank 0 checks the folder and holds the lock
        return run(model_args, data_args, caption_args, training_args)
    preflight.check_output_dir(out)
    with preflight.OutputFolderLock(out):
        return run(model_args, data_args, caption_args, training_args)


def run(model_args, data_args, caption_args, training_args):
    from clipqwen import faults, hub, preflight
    from clipqwen.data import CaptionCollator, CaptionEpochCallback, add_caption_lengths, expand_captions
    from clipqwen.trainer import CaptionTrainer

    last_checkpoint, finished = None, None
    timer = PhaseTimer()
    out = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "false"):  # `--resume_from_checkpoint True`: the newest one
        resume = training_args.resume_from_checkpoint = None
    if resume is not None and training_args.do_train:
        faults.check_resume_checkpoint(resume)  # a torn folder is refused, naming what is wrong and what is complete
    if out.is_dir() and training_args.do_train and resume is None and not caption_args.overwrite_output_dir:
        if (out / RUN_COMPLETE).is_file():
            # The same command again (to add --do_predict, or after a crash past the export): evaluate and export
            # the finished model instead of training on past --max_steps.
            finished = json.loads((out / RUN_COMPLETE).read_text())
            logger.warning("%s holds a finished run (step %s): evaluating and exporting it without training. Pass "
                           "--overwrite_output_dir to train afresh.", out, finished["global_step"])
            model_args = dataclasses.replace(model_args, model_name_or_path=str(out), model_revision=None, lora_r=0)
            training_args.do_train = False
        else:
            # Not transformers' get_last_checkpoint: that takes the highest checkpoint-N, torn or not.
            last_checkpoint = faults.last_complete_checkpoint(out)
            if last_checkpoint is None and (out / "config.json").exists():
                raise ValueError(f"{out} already holds a model (config.json) from an earlier run, and no checkpoint-* to "
                                 "resume. Choose another --output_dir, or pass --overwrite_output_dir to train into it anyway.")
            if last_checkpoint:
                logger.info("Resuming from %s (pass another --output_dir to start afresh).", last_checkpoint)

    set_seed(training_args.seed)
    with timer.phase("model loading"):
        model, processor = build_model_and_processor(model_args)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    preflight.check_against_model(data_args, caption_args, base.config, len(processor.tokenizer(caption_args.prompt).input_ids))
    if training_args.should_save:
        preflight.check_output_dir(out, preflight.needed_bytes(model))
    if not (data_args.dataset_name == "embedded" or data_args.local_files):
        hub.go_offline_if_hub_unreachable([data_args.dataset_name])  # fail in a second, not after retries
        # one version of the data for the whole run (and every rank), recorded in the model card
        data_args.dataset_revision = hub.resolve_dataset_revision(data_args.dataset_name, data_args.dataset_revision)
    cached = data_args.use_feature_cache and base.config.freeze_vision_model
    with timer.phase("data preparation") as phase, training_args.main_process_first(desc="data preparation"):
        # rank 0 fills datasets' caches, the others read them
        splits, sample_images = load_and_clean(data_args, model_args, training_args, check_images=not cached)
        phase["items"] = sum(len(dataset) for dataset in splits.values())
    if cached:  # all ranks at once, each its own shard
        splits, sample_images = add_features(splits, sample_images, data_args, training_args, base, processor, timer)

    train_dataset = None
    if training_args.do_train:
        train_dataset = expand_captions(splits["train"]) if data_args.caption_mode == "all" else splits["train"]
    eval_pairs = {split: expand_captions(splits[split]) for split in ("validation", "test") if split in splits}
    if training_args.train_sampling_strategy == "group_by_length":  # Trainer groups evaluation batches too
        train_dataset = add_caption_lengths(train_dataset, processor.tokenizer) if train_dataset is not None else None
        eval_pairs = {split: add_caption_lengths(pairs, processor.tokenizer) for split, pairs in eval_pairs.items()}
    collator = CaptionCollator(processor, data_args.max_caption_length, prompt=caption_args.prompt, seed=training_args.seed)
    # min_new_tokens: a captioner never answers with nothing (an untrained model's first greedy token is often the end)
    generation_kwargs = {"max_new_tokens": caption_args.max_new_tokens, "min_new_tokens": 1, "num_beams": caption_args.num_beams}
    trainer = CaptionTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_pairs.get("validation"),
        data_collator=collator,
        callbacks=[CaptionEpochCallback(collator)],
        generation_datasets={"eval": splits.get("validation"), "test": splits.get("test")},
        generation_collator=CaptionCollator(processor, for_generation=True, prompt=caption_args.prompt),
        generation_kwargs=generation_kwargs,
    )
    if finished:  # the card describes the training that happened, not this evaluation-only rerun
        trainer.state = TrainerState.load_from_json(str(out / "trainer_state.json"))

    metrics = {}
    if training_args.do_train:
        try:
            with timer.phase("training", items=len(train_dataset), unit="pairs per epoch"):
                result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
        except (faults.NonFiniteLossError, faults.CheckpointSaveError, faults.IncompatibleCheckpointError) as error:
            logger.error("%s", error)
            raise SystemExit(f"error: {error}") from error
        if trainer.preempted:  # SIGTERM or Ctrl-C: the checkpoint is written; leave before the grace period ends
            logger.warning("Stopped on %s after saving the checkpoint of step %d in %s; rerun the same command to resume.",
                           trainer.graceful_stop.signal_name, trainer.state.global_step, training_args.output_dir)
            return {"preempted_at_step": trainer.state.global_step}
        train_metrics = dict(result.metrics, train_samples=len(train_dataset))
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    for prefix, split, flag in (("eval", "validation", training_args.do_eval), ("test", "test", training_args.do_predict)):
        if flag:
            with timer.phase(f"evaluation {split}", items=len(splits[split])):
                split_metrics = trainer.evaluate(eval_dataset=eval_pairs[split], metric_key_prefix=prefix)
            split_metrics[f"{prefix}_num_images"] = len(splits[split])
            trainer.log_metrics(prefix, split_metrics)
            trainer.save_metrics(prefix, split_metrics)
            metrics.update(split_metrics)

    if training_args.should_save:
        try:
            with timer.phase("export"):
                trainer.save_metrics("timing", timer.metrics())  # in all_results.json and the card (the push comes after)
                folder = export(trainer, model_args, data_args, training_args, processor, metrics, generation_kwargs,
                                sample_images, timer)
        except OSError as error:  # a full disk, a vanished folder: what training produced is in the last checkpoint
            checkpoint = faults.last_complete_checkpoint(out, verify_hashes=False, log=False)
            raise SystemExit(f"error: exporting to {out} failed ({error}). "
                             + (f"The last complete checkpoint, {checkpoint}, is intact: free some space and rerun the "
                                "same command to export it without training again." if checkpoint else
                                "No checkpoint was saved (--save_strategy no): free some space and rerun.")) from error
        logger.info("Model, processor, metrics, predictions and model card in %s", folder)
        if training_args.push_to_hub:
            try:
                with timer.phase("push"):
                    metrics["hub_commit"] = hub.push_export(folder, trainer.hub_model_id, revision=training_args.hub_revision,
                                                            token=training_args.hub_token)
            except Exception as error:  # noqa: BLE001 - network, permissions, quota: the run itself is complete
                raise SystemExit(f"error: pushing {folder} to {trainer.hub_model_id} failed ({type(error).__name__}: "
                                 f"{error}). Everything is saved in {folder}; push it again with "
                                 f"`python -m clipqwen.hub {folder} {trainer.hub_model_id}`.") from error
        trainer.save_metrics("timing", timer.metrics())  # export and push times too, in the local all_results.json
    return metrics | timer.metrics()


if __name__ == "__main__":
    main()
