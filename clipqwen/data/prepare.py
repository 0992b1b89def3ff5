"""Data preparation for run_captioning.py: the splits a run needs, limited and cleaned, and with a
frozen vision tower their features computed once per image. clipqwen.data does each step; this
module picks the steps, their order, the device and the DDP coordination.

    data = prepare_data(data_args, training_args, model, processor, timer, vision_features=True)
    train, pairs = trainer_datasets(data, data_args, training_args, processor.tokenizer)
"""

from dataclasses import dataclass

import torch.distributed as dist
from datasets import Dataset

from ..hub import clipqwen_cache_dir
from ..training.timing import PhaseTimer
from .cleaning import add_caption_lengths, drop_unreadable_images, expand_captions, remove_empty_captions
from .feature_cache import Processes, add_vision_features
from .sources import load_caption_data


@dataclass
class CaptionData:
    """The splits a run needs, one row per image: `splits` with image-tower features (`vision_embeds`) when
    cached, `with_images` with their images, undecoded (for the sample grid)."""

    splits: dict[str, Dataset]
    with_images: dict[str, Dataset]


def prepare_data(
    data_args,
    training_args,
    model,
    processor,
    timer: PhaseTimer,
    *,
    vision_features: bool,
    cache_dir: str | None = None,
) -> CaptionData:
    """Load, limit and clean the splits `training_args` asks for; with `vision_features` (a frozen
    image tower and --use_feature_cache), replace images by cached features. `model` is not peft's."""
    with timer.phase("data preparation") as phase, training_args.main_process_first(desc="data preparation"):
        # rank 0 fills datasets' caches, the others read them
        splits = load_and_clean(data_args, training_args, cache_dir, check_images=not vision_features)
        phase["items"] = sum(len(dataset) for dataset in splits.values())
    with_images = dict(splits)
    if vision_features:  # all ranks at once, each its own shard
        with timer.phase("feature cache", items=phase["items"]):
            splits = add_features(splits, data_args, training_args, model, processor)
    return CaptionData(splits=splits, with_images=with_images)


def trainer_datasets(data: CaptionData, data_args, training_args, tokenizer):
    """(train, {"validation": ..., "test": ...}) as Trainer reads them: training one row per image
    (or per caption with --caption_mode all), the others one row per caption for the loss, each with
    its caption's `length` (CaptionTrainer scores them longest first); with group_by_length the
    training rows get theirs too."""
    train = None
    if training_args.do_train:
        train = data.splits["train"]
        train = expand_captions(train) if data_args.caption_mode == "all" else train
    pairs = {split: expand_captions(data.splits[split]) for split in ("validation", "test") if split in data.splits}
    # CaptionTrainer scores the pairs longest first (less padding), whatever the training's sampling
    pairs = {split: add_caption_lengths(rows, tokenizer) for split, rows in pairs.items()}
    if training_args.train_sampling_strategy == "group_by_length" and train is not None:
        train = add_caption_lengths(train, tokenizer)
    return train, pairs


def load_and_clean(data_args, training_args, cache_dir: str | None = None, check_images: bool = True):
    """The wanted splits, limited and cleaned. `check_images=False` leaves the unreadable-image check to the feature
    pass (one decode per image); `--check_images False` turns it off."""
    raw = load_caption_data(data_args, cache_dir=cache_dir)
    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_predict_samples,
    }
    evaluates_during_training = training_args.do_train and training_args.eval_strategy != "no"
    wanted = {
        "train": training_args.do_train,
        "validation": training_args.do_eval or evaluates_during_training,
        "test": training_args.do_predict,
    }
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
        raise ValueError(
            f"The data has no {', '.join(missing)} split; it has {list(raw)}. Give the matching files or "
            "directories, or drop the corresponding --do_* flag."
        )
    return splits


def add_features(splits, data_args, training_args, model, processor):
    """Image-tower features for every split, each image decoded once (also the unreadable-image check).
    Under DDP each rank encodes its shard, and all wait for all before reading the merged cache."""
    cache_dir = data_args.feature_cache_dir or clipqwen_cache_dir() / "features"
    processes = Processes(
        training_args.process_index,
        training_args.world_size,
        training_args.local_process_index,
        dist.barrier if training_args.world_size > 1 else None,
    )
    model.model.vision_tower.to(training_args.device)
    try:
        return {
            split: add_vision_features(
                dataset,
                model,
                processor,
                cache_dir,
                training_args.per_device_eval_batch_size * 4,
                split=split,
                num_workers=data_args.preprocessing_num_workers,
                drop_unreadable=data_args.check_images,
                processes=processes,
            )
            for split, dataset in splits.items()
        }
    finally:
        model.model.vision_tower.to("cpu")  # Trainer moves the whole model later; this keeps its devices consistent
