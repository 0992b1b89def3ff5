#!/usr/bin/env python
"""Train, evaluate and publish a ClipQwen image captioner with HF Trainer.

    accelerate launch run_captioning.py --output_dir out --do_train --do_eval --do_predict  # Flickr30K, real backbones
    python run_captioning.py configs/embedded-tiny.json                         # offline demo, a few CPU minutes

Arguments come as flags or one JSON file (HfArgumentParser), as in transformers' run_*.py examples.
The steps: model and processor → data, cleaned, frozen image-tower features cached → Trainer (resuming) →
captions scored on validation and test → export with a model card → push (docs/training.md).
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch
import transformers
from huggingface_hub import constants
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoTokenizer, HfArgumentParser, TrainerState, TrainingArguments, set_seed

from clipqwen import hub
from clipqwen.backbones.assemble import from_pretrained_backbones, match_processor, tower_image_processor
from clipqwen.data.collator import CaptionCollator, CaptionEpochCallback
from clipqwen.data.prepare import prepare_data, trainer_datasets
from clipqwen.inference.captioning import CAPTION_GENERATION
from clipqwen.inference.loading import ModelLoadError, load_clipqwen
from clipqwen.precision import choose_precision
from clipqwen.presets import DEFAULT_PRESET, LAYOUTS, layout_config
from clipqwen.publishing.export import exit_if_export_fails, export, push_to_hub
from clipqwen.publishing.model_card import parameter_counts
from clipqwen.tiny import bundled_processor, tiny_config
from clipqwen.training import preflight
from clipqwen.training.checkpoints import CheckpointSaveError, IncompatibleCheckpointError
from clipqwen.training.freezing import add_lora, freeze_backbones, set_training_dtypes
from clipqwen.training.reliance import warn_if_image_ignored
from clipqwen.training.rerun import starting_point
from clipqwen.training.timing import PhaseTimer
from clipqwen.training.trainer import CaptionTrainer, LostImagesError, NonFiniteLossError
from configuration_clipqwen import ProjectorType, VisionFeatureType
from modeling_clipqwen import ClipQwenForConditionalGeneration
from processing_clipqwen import ClipQwenProcessor


logger = logging.getLogger("run_captioning")

FLICKR30K = "nlphuji/flickr30k"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A trained clipqwen model (folder or Hub id) to continue from. Without it the model is assembled "
            "from the two backbones below."
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of --model_name_or_path."})
    vision_model_name_or_path: str = field(
        default="openai/clip-vit-base-patch32",
        metadata={
            "help": "Image model (Hub id or folder; CLIP by default, any Auto vision model) for the vision tower and "
            "image processor."
        },
    )
    vision_model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of --vision_model_name_or_path."}
    )
    text_model_name_or_path: str = field(
        default="Qwen/Qwen3-0.6B-Base",
        metadata={"help": "Causal language model (Hub id or folder; Qwen3 by default) for the decoder and tokenizer."},
    )
    text_model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of --text_model_name_or_path."}
    )
    tiny_model: bool = field(
        default=False,
        metadata={
            "help": "Build a tiny randomly initialised model with the bundled Qwen3 tokenizer (offline demo, tests) "
            "instead of loading backbones."
        },
    )
    # The config's own Literal types: argparse offers and checks their choices; the config checks every field again
    # when it is built (a JSON argument file's values reach it unchecked by argparse).
    preset: Literal[tuple(LAYOUTS)] = field(
        default=DEFAULT_PRESET,
        metadata={
            "help": "Layout of a new model; --projector_type, --vision_feature_type, --num_pooled_image_tokens and "
            "--prompt override its parts. 'clipcap': the pooled image embedding → MLP → 8 image tokens after the "
            "prompt 'Image:', which learned from the image on real photos (docs/flickr8k.md). 'resampler': "
            "--num_query_tokens learned queries read the image tower's feature map (--vision_feature_layer) and "
            "become image tokens after 'Image:'. 'seed_exact': the "
            "project's first design, pooled embedding → Linear → one image token first, no prompt; with a frozen "
            "pretrained decoder it did not learn to use the image."
        },
    )
    projector_type: ProjectorType | None = field(
        default=None,
        metadata={
            "aliases": ["--adapter_type"],  # its first name, for older commands
            "help": "Projector: 'linear' (the seed's), 'mlp2x_gelu' (LLaVA-1.5's) or 'resampler' (learned queries "
            "over the feature map; needs --vision_feature_type patch). Default: the preset's.",
        },
    )
    vision_feature_type: VisionFeatureType | None = field(
        default=None,
        metadata={
            "help": "Image features: the pooled embedding, every position's hidden state (LLaVA), or the pooled "
            "embedding and the means of a --vision_grid_size grid of cells over the feature map. Default: the "
            "preset's."
        },
    )
    num_pooled_image_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Image tokens made from each pooled embedding (ClipCap's K; with --vision_feature_type grid "
            "the image's and each cell's). Default: the preset's."
        },
    )
    vision_grid_size: int = field(
        default=2, metadata={"help": "Cells per side of the grid with --vision_feature_type grid."}
    )
    num_query_tokens: int = field(
        default=8, metadata={"help": "Image tokens the resampler makes (--projector_type resampler)."}
    )
    vision_feature_layer: int = field(
        default=-2, metadata={"help": "Vision-tower hidden-state index for --vision_feature_type patch or grid."}
    )
    freeze_vision_model: bool = field(
        default=True, metadata={"help": "Keep the vision tower frozen (enables the feature cache)."}
    )
    freeze_language_model: bool = field(
        default=True, metadata={"help": "Keep the language model frozen (LoRA still trains its own weights)."}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the language model; 0 turns LoRA off."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj",
        metadata={"help": "Comma-separated language-model module names that get LoRA (never the vision tower)."},
    )
    merge_lora: bool = field(
        default=True,
        metadata={
            "help": "Merge LoRA into the exported model (self-contained folder); the LoRA adapter is also saved in "
            "<output_dir>/lora."
        },
    )
    auto_bf16: bool = field(
        default=True,
        metadata={
            "help": "On a CUDA GPU with bf16 support, train and evaluate in bf16 unless --fp16/--bf16 is given."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data sets are cached."})

    def __post_init__(self):
        for name, value in layout_config(self.preset).items():  # the preset's, for each layout flag left unset
            if getattr(self, name) is None:  # (its prompt is set in run(): a given model keeps its own)
                setattr(self, name, value)
        if self.lora_r < 0 or (self.lora_r and not self.lora_target_modules.strip()):
            raise ValueError("--lora_r must be >= 0, and LoRA needs --lora_target_modules.")
        if self.lora_r and not self.freeze_language_model:
            raise ValueError("LoRA trains a frozen language model: drop --freeze_language_model False or --lora_r.")
        if self.lora_r and not self.freeze_vision_model:
            # peft freezes everything outside LoRA and modules_to_save, and a CLIP tower in modules_to_save is wrapped
            # twice (its inner `vision_model` matches too): the vision tower would silently stay frozen.
            raise ValueError(
                "--lora_r with --freeze_vision_model False is not supported: LoRA would leave the image "
                "tower frozen. Fine-tune the tower without LoRA, or keep --freeze_vision_model True."
            )


@dataclass
class DataTrainingArguments:
    dataset_name: str = field(
        default=FLICKR30K,
        metadata={
            "help": "Hub data set or local folder of parquet/json files; 'embedded' for the generated offline data "
            "set."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Data set configuration."})
    dataset_revision: str | None = field(
        default="refs/convert/parquet",
        metadata={
            "help": "Data set revision; Flickr30K's parquet conversion lives on refs/convert/parquet, a ref that "
            "moves when the Hub re-converts: the run resolves it to a commit sha, logs it and writes it into the "
            "model card; pass that sha to load exactly the same data."
        },
    )
    split_column: str | None = field(
        default="split",
        metadata={
            "help": "Column with split names (Flickr30K: Karpathy train/val/test); empty to use the data set's own "
            "splits."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "JSONL or CSV: an image path column (relative to the file) and a caption column."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Like --train_file."})
    test_file: str | None = field(default=None, metadata={"help": "Like --train_file."})
    train_dir: str | None = field(
        default=None, metadata={"help": "imagefolder with metadata.jsonl (file_name + captions)."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Like --train_dir."})
    test_dir: str | None = field(default=None, metadata={"help": "Like --train_dir."})
    image_column: str = field(default="image", metadata={"help": "Column with the image (or its path in JSONL/CSV)."})
    caption_column: str = field(default="caption", metadata={"help": "Column with a caption or a list of captions."})
    id_column: str | None = field(
        default=None,
        metadata={
            "help": "Column with an image id used in predictions (default: the `filename` column if there is one, as "
            "in Flickr30K, else the image's path inside the annotation file's folder, or the row number). Two images "
            "with one id are refused."
        },
    )
    caption_mode: Literal["random", "all"] = field(
        default="random",
        metadata={"help": "'random': one random caption per image per epoch; 'all': every caption is its own pair."},
    )
    max_caption_length: int = field(
        default=64, metadata={"help": "Caption tokens kept (including the end token); longer ones are truncated."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation images."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only this many test images."})
    use_feature_cache: bool = field(
        default=True,
        metadata={"help": "With a frozen image tower, compute its features once per image and train from them."},
    )
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "Where cached image features go (default: $HF_HOME/clipqwen/features)."}
    )
    check_images: bool = field(
        default=True,
        metadata={"help": "Decode every image before training and skip unreadable ones (logged with names)."},
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Processes that decode and preprocess images: for the feature cache (decode once, check and "
            "encode; the vision tower runs in the main process on their batches) or, without it, for the "
            "unreadable-image check. Default: none, the main process does it."
        },
    )

    def __post_init__(self):
        files = [self.train_file, self.validation_file, self.test_file]
        for path in filter(None, files):
            if Path(path).suffix.lower() not in (".jsonl", ".json", ".csv"):
                raise ValueError(
                    f"{path}: annotation files must be .jsonl, .json or .csv (.json holding one JSON "
                    "object per line, as .jsonl does)."
                )
        if self.caption_mode not in ("random", "all"):
            raise ValueError(f"--caption_mode {self.caption_mode!r}: use 'random' or 'all'.")
        if self.max_caption_length < 2:
            raise ValueError("--max_caption_length must be at least 2 (one word and the end token).")
        if self.dataset_revision in ("", "None"):
            self.dataset_revision = None
        if self.dataset_name == "embedded" and self.image_column == "image" and self.caption_column == "caption":
            self.caption_column = "captions"

    @property
    def local_files(self) -> list[str]:
        """The annotation files and image folders given: they replace --dataset_name."""
        files = (self.train_file, self.validation_file, self.test_file)
        folders = (self.train_dir, self.validation_dir, self.test_dir)
        return [path for path in files + folders if path]

    @property
    def local_data(self) -> list[str]:
        """The files and folders the data come from when they are on this machine: --*_file / --*_dir, else a
        local --dataset_name folder."""
        return self.local_files or ([self.dataset_name] if hub.is_local(self.dataset_name) else [])

    @property
    def on_hub(self) -> bool:
        """The data come from a Hub repository (they have a revision): not local, not the generated set."""
        return not (self.local_data or self.dataset_name == "embedded")


@dataclass
class CaptioningArguments:
    num_beams: int = field(
        default=CAPTION_GENERATION["num_beams"], metadata={"help": "Beams for evaluation and prediction captions."}
    )
    max_new_tokens: int = field(
        default=CAPTION_GENERATION["max_new_tokens"], metadata={"help": "Longest generated caption, in tokens."}
    )
    prompt: str | None = field(
        default=None,
        metadata={
            "help": "Text around the image, before the caption; a '<|image_pad|>' in it marks where the image goes "
            "(else the image comes first; '' for no prompt). Saved with the processor, which uses it whenever a "
            "caller passes no text. Default: the prompt saved with --model_name_or_path's processor, or the "
            "--preset's for a new model."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow training into an output folder that holds a finished run."}
    )


def parse_args(argv=None):
    """Flags, or one JSON file of arguments followed by flags that override it
    (`run_captioning.py configs/embedded-tiny.json --output_dir elsewhere`)."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, CaptioningArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith(".json"):
        # The file's values (JSON-typed, as parse_json_file reads them) become the defaults; the flags after it win.
        parser.set_defaults(**preflight.read_argument_file(argv[0], parser))
        argv = argv[1:]
    model_args, data_args, caption_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.ddp_find_unused_parameters is None:
        # only an unfrozen vision tower has trainable weights unused by a step (docs/distributed.md)
        training_args.ddp_find_unused_parameters = not model_args.freeze_vision_model
    return model_args, data_args, caption_args, choose_precision(model_args, training_args)


# ---- model -----------------------------------------------------------------------------------------------
def go_offline_if_hub_out_of_reach(names) -> bool:
    """This script's process works offline when some of `names` must come from the Hub and it does not answer: every
    later Hub call (backbones, processor, data) takes the local cache at once instead of retrying each file. The
    script owns its process; the library never switches it (it takes `local_files_only`)."""
    if not hub.hub_out_of_reach(names):
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    return True


def build_model_and_processor(args: ModelArguments, frozen_dtype: torch.dtype = torch.float32):
    """The model with its backbones frozen as asked, trainable weights in fp32 and frozen ones in `frozen_dtype`
    (bf16 for a bf16 run: `clipqwen.training.freezing.set_training_dtypes`), and its processor."""
    settings = dict(
        projector_type=args.projector_type,
        vision_feature_type=args.vision_feature_type,
        num_pooled_image_tokens=args.num_pooled_image_tokens,
        vision_grid_size=args.vision_grid_size,
        num_query_tokens=args.num_query_tokens,
        vision_feature_layer=args.vision_feature_layer,
    )
    if not args.tiny_model:  # an unreachable Hub fails in a second, not after retries per file
        go_offline_if_hub_out_of_reach(
            [args.model_name_or_path]
            if args.model_name_or_path
            else [args.vision_model_name_or_path, args.text_model_name_or_path]
        )
    try:
        if args.model_name_or_path:
            # clipqwen only (installed classes, safetensors), in fp32: frozen parts are cast below
            model, processor = load_clipqwen(
                args.model_name_or_path, args.model_revision, cache_dir=args.cache_dir, dtype=torch.float32
            )
            model.train()
        elif args.tiny_model:
            model = ClipQwenForConditionalGeneration(tiny_config(**settings))
            processor = bundled_processor(num_image_tokens=model.config.num_image_tokens)
        else:
            # each backbone straight in the dtype it trains or is kept in, not its checkpoint's
            model = from_pretrained_backbones(
                args.vision_model_name_or_path,
                args.text_model_name_or_path,
                vision_revision=args.vision_model_revision,
                text_revision=args.text_model_revision,
                cache_dir=args.cache_dir,
                vision_kwargs={"dtype": frozen_dtype if args.freeze_vision_model else torch.float32},
                text_kwargs={"dtype": frozen_dtype if args.freeze_language_model else torch.float32},
                **settings,
            )
            image_processor = tower_image_processor(
                args.vision_model_name_or_path, revision=args.vision_model_revision, cache_dir=args.cache_dir
            )
            tokenizer = AutoTokenizer.from_pretrained(
                args.text_model_name_or_path, revision=args.text_model_revision, cache_dir=args.cache_dir
            )
            processor = ClipQwenProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens)
    except (OSError, ModelLoadError) as error:
        if local := hub.local_file_error(error):  # a write to the cache failed: not a download problem
            raise SystemExit(f"error: could not load the model: {local}. {hub.local_file_hint(local)}") from error
        if isinstance(error, ModelLoadError) and not isinstance(error.__cause__, OSError):
            raise  # not a download problem: the message says what is wrong with the model
        raise SystemExit(
            f"Could not load the model: {error}\nWithout access to the Hugging Face Hub, pass local folders "
            "(--model_name_or_path, or --vision_model_name_or_path and --text_model_name_or_path), set "
            "HF_HUB_OFFLINE=1 to use the local cache, or use --tiny_model for the offline demo."
        ) from error
    # placeholder, end and pad tokens as the processor writes them (a no-op for Qwen3)
    match_processor(model, processor)
    freeze_backbones(model, vision=args.freeze_vision_model, language=args.freeze_language_model)
    set_training_dtypes(model, frozen_dtype)
    if args.lora_r:
        model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    return model, processor


# ---- main ------------------------------------------------------------------------------------------------
def main(args=None):
    # 1. Arguments: flags, or one JSON file followed by flags that override it
    model_args, data_args, caption_args, training_args = args if args is not None else parse_args()
    training_args.remove_unused_columns = False  # the collator needs the image / feature columns
    training_args.label_names = ["labels"]

    # 2. Logging
    setup_logging(training_args)

    # Bad values fail now, naming the flag, not after hours of training; one run at a time per output folder.
    preflight.check_arguments(data_args, caption_args, training_args)
    try:
        if not training_args.should_save:  # other ranks: rank 0 checks the folder and holds the lock
            return run(model_args, data_args, caption_args, training_args)
        preflight.check_output_dir(Path(training_args.output_dir))
        with preflight.OutputFolderLock(training_args.output_dir):
            return run(model_args, data_args, caption_args, training_args)
    finally:
        # leave the process group: a rank exiting with it alive can abort (docs/distributed.md)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def setup_logging(training_args):
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    # our progress lines (data revision, cache, pushes): INFO on the main process, or --log_level
    own_level = logging.INFO if training_args.should_log and training_args.log_level == "passive" else log_level
    for library_logger in (logger, logging.getLogger("clipqwen")):
        library_logger.setLevel(own_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(
        "process rank %s, device %s, n_gpu %s, distributed %s",
        training_args.process_index,
        training_args.device,
        training_args.n_gpu,
        training_args.parallel_mode.value,
    )


def run(model_args, data_args, caption_args, training_args) -> dict:
    """Steps 3 to 9, with the output folder held by `main`. Returns the metrics (train_*, eval_*, test_*, time_*)."""
    timer = PhaseTimer()
    out = Path(training_args.output_dir)

    # 3. The checkpoint to resume from, or a finished run to evaluate and export again (or train on, for longer)
    model_args, last_checkpoint, finished = starting_point(out, model_args, data_args, caption_args, training_args)
    set_seed(training_args.seed)

    # 4. Model and processor
    with timer.phase("model loading"):
        # frozen weights in bf16 for a bf16 run: half the bytes, and what autocast would round them to anyway
        frozen_dtype = torch.bfloat16 if training_args.bf16 else torch.float32
        model, processor = build_model_and_processor(model_args, frozen_dtype)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if caption_args.prompt is not None:  # exported with the processor: users get it by default
        processor.prompt = caption_args.prompt
    elif not model_args.model_name_or_path:
        processor.prompt = LAYOUTS[model_args.preset]["prompt"]
    prompt_tokens = len(processor(text=[""], return_tensors=None)["input_ids"][0]) - processor.num_image_tokens
    preflight.check_against_model(data_args, caption_args, base.config, prompt_tokens)
    if training_args.should_save:
        preflight.check_output_dir(out, preflight.needed_bytes(model))

    # 5. Data: one layout (image_id, image, captions), cleaned; image features cached when the image tower is frozen
    if data_args.on_hub:
        go_offline_if_hub_out_of_reach([data_args.dataset_name])  # fail in a second, not after retries
        # one version of the data for the whole run (and every rank), recorded in the model card
        data_args.dataset_revision = hub.resolve_dataset_revision(data_args.dataset_name, data_args.dataset_revision)
    features = data_args.use_feature_cache and model_args.freeze_vision_model
    data = prepare_data(
        data_args, training_args, base, processor, timer, cache_dir=model_args.cache_dir, vision_features=features
    )
    train_dataset, eval_pairs = trainer_datasets(data, data_args, training_args, processor.tokenizer)

    # 6. Trainer
    collator = CaptionCollator(processor, data_args.max_caption_length, seed=training_args.seed)
    # written into the exported generation_config.json: what the scores were measured with
    generation_kwargs = CAPTION_GENERATION | {
        "max_new_tokens": caption_args.max_new_tokens,
        "num_beams": caption_args.num_beams,
    }
    trainer = CaptionTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_pairs.get("validation"),
        data_collator=collator,
        callbacks=[CaptionEpochCallback(collator)],
        generation_datasets={"eval": data.splits.get("validation"), "test": data.splits.get("test")},
        generation_collator=CaptionCollator(processor, for_generation=True),
        generation_kwargs=generation_kwargs,
    )
    if finished:  # the card describes the training that happened, not this evaluation-only rerun
        trainer.state = TrainerState.load_from_json(str(out / "trainer_state.json"))

    # 7. Training
    metrics = {}
    if training_args.do_train:
        train_metrics = train(trainer, train_dataset, last_checkpoint, timer)
        if train_metrics is None:  # SIGTERM or Ctrl-C: the checkpoint is written
            return {"preempted_at_step": trainer.state.global_step}
        metrics.update(train_metrics)

    # 8. Evaluation: validation loss, then generated captions scored against all references
    predictions = evaluate(trainer, data, eval_pairs, metrics, timer)

    # 9. Export (rank 0), then push
    if not training_args.should_save:
        return metrics | timer.metrics()
    with exit_if_export_fails(out), timer.phase("export"):
        trainer.save_metrics("timing", timer.metrics())  # in all_results.json and the card (the push comes after)
        folder = export(
            trainer, processor, data, predictions, metrics, timer, model_args=model_args, data_args=data_args
        )
    logger.info("Model, processor, metrics, predictions and model card in %s", folder)
    if training_args.push_to_hub:
        with timer.phase("push"):
            metrics["hub_commit"] = push_to_hub(folder, trainer.hub_model_id, training_args)
    trainer.save_metrics("timing", timer.metrics())  # export and push times too, in the local all_results.json
    # the run's last word: whether the captions depend on the photos at all
    warn_if_image_ignored(metrics, "eval" if "eval_image_reliance" in metrics else "test")
    return metrics | timer.metrics()


def train(trainer, train_dataset, last_checkpoint, timer) -> dict | None:
    """Step 7: train, resuming from `last_checkpoint`. The train_* metrics, saved; None when SIGTERM or Ctrl-C
    stopped the run (its checkpoint written: the same command resumes)."""
    try:
        with timer.phase("training", unit="pairs") as phase:
            result = trainer.train(resume_from_checkpoint=last_checkpoint)
            phase["items"] = result.metrics["train_pairs"]
    except (NonFiniteLossError, LostImagesError, CheckpointSaveError, IncompatibleCheckpointError) as error:
        logger.error("%s", error)
        raise SystemExit(f"error: {error}") from error
    if trainer.preempted:  # leave before the grace period ends
        logger.warning(
            "Stopped on %s after saving the checkpoint of step %d in %s; rerun the same command to resume.",
            trainer.graceful_stop.signal_name,
            trainer.state.global_step,
            trainer.args.output_dir,
        )
        return None
    train_metrics = dict(
        result.metrics,
        train_samples=len(train_dataset),
        **{f"train_{key}_parameters": n for key, n in parameter_counts(trainer.model).items()},
    )
    trainer.log_metrics("train", train_metrics)
    # the first writes after training: a full disk here costs no training either
    with exit_if_export_fails(Path(trainer.args.output_dir)):
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
    return train_metrics


def evaluate(trainer, data, eval_pairs, metrics: dict, timer) -> dict[str, list[dict]]:
    """Step 8: the loss pass, then generated captions scored against all references, on validation (--do_eval)
    and test (--do_predict). Adds the scores to `metrics`; returns split -> one row per image (image_id, caption,
    references)."""
    predictions = {}
    for prefix, split, flag in (
        ("eval", "validation", trainer.args.do_eval),
        ("test", "test", trainer.args.do_predict),
    ):
        if not flag:
            continue
        with timer.phase(f"evaluation {split}", items=len(data.splits[split])):
            output = trainer.predict(eval_pairs[split], metric_key_prefix=prefix)
            trainer.log(output.metrics)  # as evaluate() does: into the log history (curves) and the loggers
        split_metrics = dict(output.metrics, **{f"{prefix}_num_images": len(data.splits[split])})
        trainer.log_metrics(prefix, split_metrics)
        trainer.save_metrics(prefix, split_metrics)
        metrics.update(split_metrics)
        predictions[split] = output.predictions
    return predictions


if __name__ == "__main__":
    try:
        main()
    except (ValueError, StrictDataclassError) as error:
        # Bad input is refused with a ValueError (a config value: StrictDataclassError) naming the flag, file or row
        # and what to do: that sentence is the answer. The traceback stays available at --log_level debug.
        logger.debug("Where the refusal came from:", exc_info=True)
        raise SystemExit(f"run_captioning.py: error: {error}") from None
