"""CaptionTrainer: HF Trainer plus caption evaluation, small checkpoints and fault handling.

Evaluation captions every image and scores it against all references; `predict()` returns one row
per image (`image_id`, `caption`, `references`). Checkpoints hold only what trains and the optimizer
state, marked complete (clipqwen.training.checkpoints) before they are pushed or rotated. See
docs/reliability.md for each fault: a NaN loss, SIGTERM, a failed save, images lost mid-run.
"""

import contextlib
import math
import os
import shutil
import time
from pathlib import Path

import safetensors.torch
import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .. import hub
from ..caption_metrics import load_caption_metric
from . import checkpoints
from .freezing import lora_merged
from .reliance import RelianceMeter
from .signals import GracefulStopCallback


logger = logging.get_logger(__name__)

TRAINABLE_WEIGHTS = "trainable_weights.safetensors"
# Images lost mid-run are left out up to this share of the training images (at least one); past it
# the data has changed under the run, and training stops with a checkpoint.
MAX_LOST_IMAGE_SHARE = 0.01


class LostImagesError(RuntimeError):
    """Too many training images could no longer be read; the message names one and the checkpoint saved."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


def nonfinite_loss_message(loss_value: float, step: int, epoch: float | None, output_dir) -> str:
    kind = "NaN" if math.isnan(loss_value) else "infinite"
    last = checkpoints.last_complete_checkpoint(output_dir, verify_hashes=False, log=False)
    return (
        f"The training loss is {kind} at step {step}"
        + (f" (epoch {epoch:.2f})" if epoch else "")
        + ": training stopped before the optimizer step, so no weights were updated with it and no checkpoint "
        "was written after it. "
        + (
            f"The last complete checkpoint is {last}; rerunning the same command resumes from it. "
            if last
            else "No checkpoint was saved before it. "
        )
        + "Common causes: a learning rate too high (--learning_rate), no gradient clipping (--max_grad_norm), "
        "fp16 overflow (try --bf16 or fp32), or bad data in that step's batch."
    )


class CaptionTrainer(Trainer):
    def __init__(self, *args, generation_datasets=None, generation_collator=None, generation_kwargs=None, **kwargs):
        """generation_datasets: {metric prefix ("eval", "test"): one row per image with `captions`}."""
        super().__init__(*args, **kwargs)
        self.graceful_stop = GracefulStopCallback(reduce=self._any_process if self.args.world_size > 1 else None)
        self.add_callback(self.graceful_stop)
        self.generation_datasets = generation_datasets or {}
        self.generation_collator = generation_collator
        self.generation_kwargs = generation_kwargs or {}
        self.caption_metric = load_caption_metric() if any(self.generation_datasets.values()) else None
        self.lost_images = {}  # metric prefix ("train", "eval", "test") -> ids of images left out (this process)
        self.pairs_trained = 0  # image-caption pairs in this process's training batches, for the throughput
        self._metric_prefix = "eval"  # the evaluation in progress, for prediction_step's count
        self._reliance = None  # the evaluation in progress's RelianceMeter
        self._max_lost_images = None  # from the training images, counted on first use

    # ---- images lost mid-run ---------------------------------------------------------------------------------
    def _note_lost(self, prefix: str, inputs: dict) -> bool:
        """Counts the batch's `lost_images` (the collator's); True when the batch has no row left."""
        self.lost_images.setdefault(prefix, set()).update(inputs.pop("lost_images", ()))
        return "input_ids" not in inputs

    def lost_image_count(self, prefix: str) -> int:
        """Images left out under `prefix`, over all processes."""
        ids = sorted(self.lost_images.get(prefix, ()))
        return len(set(gather_object(ids))) if self.args.world_size > 1 else len(ids)

    def _check_lost_training_images(self, empty_batch: bool):
        lost = self.lost_images.get("train", set())
        if self._max_lost_images is None:
            images = len(set(self.train_dataset.with_format(None)["image_id"]))
            self._max_lost_images = max(1, int(MAX_LOST_IMAGE_SHARE * images))
        # a process with no rows cannot skip its step alone: the others would wait for its gradients
        stop = len(lost) > self._max_lost_images or (empty_batch and self.args.world_size > 1)
        if self.args.world_size > 1:
            stop = self._any_process(stop)
        if stop:
            example = f", e.g. image id {min(lost)}" if lost else ""
            raise LostImagesError(
                f"{len(lost)} training image(s) on this process could no longer be read (the warnings above name "
                f"them{example}): more than the run tolerates, {MAX_LOST_IMAGE_SHARE:.0%} of its images and at least "
                f"one ({self._max_lost_images}), or a batch with none left on a multi-process run. Training stopped"
            )

    # ---- evaluation ----------------------------------------------------------------------------------
    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._metric_prefix = metric_key_prefix
        self._reliance = RelianceMeter()
        output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
        if self._reliance.sums["tokens"]:
            # per supervised token over the split, whatever the batching (Trainer's averages the batches' means)
            output.metrics.update({f"{metric_key_prefix}_{key}": v for key, v in self._reliance.metrics().items()})
            if self._reliance.sums["skipped"]:
                logger.warning(
                    "%d %s caption(s) were left out of the image reliance: no other image was available to swap "
                    "in (a first batch holding a single image).",
                    int(self._reliance.sums["skipped"]),
                    metric_key_prefix,
                )
        self._reliance = None
        dataset = self.generation_datasets.get(metric_key_prefix)
        if dataset is not None:
            start = time.perf_counter()
            captions, rows = self.generate_captions(dataset, metric_key_prefix)
            # without its format (which decodes images), reading these columns decodes nothing
            plain = dataset.with_format(None)
            all_references, image_ids = plain["captions"], plain["image_id"]
            references = [all_references[row] for row in rows]
            scores = self.caption_metric.compute(predictions=captions, references=references)
            scores["generation_seconds"] = round(time.perf_counter() - start, 2)
            output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in scores.items()})
            # in Trainer's predictions slot (no logits are gathered), so that predict() returns them
            output = output._replace(
                predictions=[
                    {"image_id": image_ids[row], "caption": caption, "references": refs}
                    for row, caption, refs in zip(rows, captions, references)
                ]
            )
        lost = self.lost_image_count(metric_key_prefix)
        output.metrics[f"{metric_key_prefix}_lost_images"] = lost
        if lost:
            logger.warning(
                "%d %s image(s) could no longer be read and were left out of its loss and captions (the "
                "warnings above name them).",
                lost,
                metric_key_prefix,
            )
        return output

    def _get_eval_sampler(self, eval_dataset):
        """Captions longest first (by the `length` column trainer_datasets adds): a batch pads to its longest: on
        Flickr8k val (its five captions of a photo in a row, batches of 64) a third of the positions were padding,
        a sixth when sorted. The loss, a sum over tokens, is the same in any order; the longest batch comes first,
        so that one too large for memory fails at once."""
        if eval_dataset is None or "length" not in getattr(eval_dataset, "column_names", ()):
            return super()._get_eval_sampler(eval_dataset)
        lengths = torch.as_tensor(eval_dataset.with_format(None)["length"])
        return lengths.argsort(descending=True, stable=True).tolist()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self._note_lost(self._metric_prefix, inputs):
            return None, None, None
        # (under FSDP or DeepSpeed only the wrapper's forward gathers the sharded weights: Trainer's own step)
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if sharded or not (prediction_loss_only and self._reliance is not None and inputs.get("labels") is not None):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # The loss pass: the training forward without the backward, no logits kept, and once more with each row's
        # image swapped for another's (image reliance).
        inputs = self._prepare_inputs(inputs)
        with torch.inference_mode(), self.compute_loss_context_manager():
            rows = self._reliance.rows(self.accelerator.unwrap_model(model), inputs)
        rows = self.gather_function(rows)  # drops the rows the last batch repeats across processes
        self._reliance.add(rows)
        return rows[:, 0].sum() / rows[:, 2].sum().clamp(min=1), None, None

    @torch.no_grad()
    def generate_captions(self, dataset, prefix: str = "eval") -> tuple[list[str], list[int]]:
        """Captions for every readable row of `dataset`, in gathered order, and the row each one belongs to."""
        dataset = dataset.add_column("row_index", list(range(len(dataset))))
        loader = DataLoader(
            dataset,
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=self.generation_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        loader = self.accelerator.prepare(loader)  # each process takes its shard
        model = self.accelerator.unwrap_model(self.model)  # DDP has no generate(); the wrapped module does
        was_training = model.training
        model.eval()
        processor = self.generation_collator.processor
        pad_id = processor.caption_end_token_id
        captions, rows = [], []
        seen = set()
        # LoRA merged while generating (~10 % faster a step); sharded weights stay as they are
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        with contextlib.nullcontext() if sharded else lora_merged(model):
            for batch in loader:
                if self._note_lost(prefix, batch):
                    new_tokens = torch.full((0, 1), pad_id, device=self.args.device)
                    row_index = torch.zeros(0, dtype=torch.long, device=self.args.device)
                else:
                    row_index = batch.pop("row_index")
                    with self.accelerator.autocast():
                        generated = model.generate(**batch, **self.generation_kwargs)
                    new_tokens = generated[:, batch["input_ids"].shape[1] :]
                # pad (lost images: row -1), gather, and keep each row once: the last batch repeats rows
                new_tokens = self.accelerator.pad_across_processes(new_tokens, dim=1, pad_index=pad_id)
                new_tokens = self.accelerator.pad_across_processes(new_tokens, dim=0, pad_index=pad_id)
                row_index = self.accelerator.pad_across_processes(row_index, dim=0, pad_index=-1)
                new_tokens, row_index = self.accelerator.gather((new_tokens, row_index))
                for tokens, row in zip(processor.batch_decode(new_tokens), row_index.tolist()):
                    if row >= 0 and row not in seen:
                        seen.add(row)
                        captions.append(tokens)
                        rows.append(row)
        model.train(was_training)
        return captions, rows

    # ---- small checkpoints -----------------------------------------------------------------------------
    def save_model(self, output_dir=None, _internal_call=False):
        is_checkpoint = (
            _internal_call and output_dir and os.path.basename(output_dir).startswith(PREFIX_CHECKPOINT_DIR)
        )
        if not is_checkpoint:
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            model = self.accelerator.unwrap_model(self.model)
            state = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
            # Not named model.safetensors: from_pretrained must not mistake it for a complete model.
            safetensors.torch.save_file(state, os.path.join(output_dir, TRAINABLE_WEIGHTS), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        path = os.path.join(resume_from_checkpoint, TRAINABLE_WEIGHTS)
        if not os.path.isfile(path):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        state = safetensors.torch.load_file(path)
        expected = {name for name, p in model.named_parameters() if p.requires_grad}
        if expected != set(state):
            raise ValueError(
                f"{path} holds the trainable weights of another setup (missing {sorted(expected - set(state))[:5]}, "
                f"unexpected {sorted(set(state) - expected)[:5]}). Resume with the same model, projector, LoRA and "
                "freezing arguments, or start a new --output_dir."
            )
        params = dict(model.named_parameters())
        for name, tensor in state.items():
            if tensor.shape != params[name].shape:
                raise checkpoints.IncompatibleCheckpointError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, the model's has {tuple(params[name].shape)} "
                    "(another projector, image-token count or model). Resume with the arguments of that run, or "
                    "start a new --output_dir."
                )
        model.load_state_dict(state, strict=False)
        logger.info("Loaded %d trainable tensors from %s", len(state), path)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # An optimizer state for other shapes makes fused AdamW write past its buffers (SIGSEGV): check first.
        if checkpoint is not None:
            checkpoints.check_optimizer_state(
                os.path.join(checkpoint, "optimizer.pt"),
                [p for group in self.optimizer.param_groups for p in group["params"]],
            )
        return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if best and os.path.isfile(os.path.join(best, TRAINABLE_WEIGHTS)):
            return self._load_from_checkpoint(best)
        return super()._load_best_model()

    # ---- Hub -------------------------------------------------------------------------------------------------
    def init_hf_repo(self, token=None, private=None):
        """The repository, private if asked, and the --hub_revision branch (Trainer's creates no branch)."""
        if self.is_world_process_zero():
            self.hub_model_id = hub.prepare_repo(
                self.args.hub_model_id or Path(self.args.output_dir).absolute().name,
                revision=self.args.hub_revision,
                private=private if private is not None else self.args.hub_private_repo,
                token=token if token is not None else self.args.hub_token,
            )

    def _push_from_checkpoint(self, checkpoint_folder):
        """Trainer calls this inside the save, before the checkpoint is marked complete: our push comes after."""

    def _push_complete_checkpoint(self, folder):
        strategy = getattr(self.args.hub_strategy, "value", self.args.hub_strategy)
        try:
            hub.push_checkpoint(
                folder, self.hub_model_id, strategy, revision=self.args.hub_revision, token=self.args.hub_token
            )
        except Exception as error:  # noqa: BLE001 - a failed upload must not stop training; the final push retries
            logger.warning(
                "Could not push %s to %s (%s: %s); training goes on, the checkpoint is saved locally.",
                folder,
                self.hub_model_id,
                type(error).__name__,
                error,
            )

    # ---- faults ----------------------------------------------------------------------------------------------
    def _any_process(self, flag: bool) -> bool:
        """True on every process if it is True on any (one tiny all-reduce per step, multi-process only)."""
        value = torch.tensor([int(flag)], device=self.args.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item())

    @property
    def preempted(self) -> bool:
        """Training stopped early on SIGTERM, after saving a checkpoint."""
        return self.graceful_stop.stopped_at is not None

    def train(self, *args, **kwargs):
        self.graceful_stop.install()
        try:
            try:
                result = super().train(*args, **kwargs)
            except LostImagesError as error:  # the steps done so far are kept: checkpoint the last one, then stop
                if not os.path.isfile(os.path.join(self._checkpoint_folder(), checkpoints.MARKER)):
                    self._save_checkpoint(self.model, trial=None)
                raise LostImagesError(
                    f"{error} after step {self.state.global_step}, whose checkpoint is saved in "
                    f"{self._checkpoint_folder()}. Rerun the same command to resume from it: "
                    "restored files are read again, and the up-front check leaves out those still "
                    "missing."
                ) from None
            result.metrics["train_lost_images"] = self.lost_image_count("train")
            pairs = torch.tensor(self.pairs_trained, device=self.args.device)
            result.metrics["train_pairs"] = int(self.accelerator.reduce(pairs, reduction="sum"))
            signalled = self.graceful_stop.requested is not None
            # The last step is always checkpointed (also after a signal past its end), so that a
            # failed export is redone by rerunning the same command, without training again.
            if not os.path.isfile(os.path.join(self._checkpoint_folder(), checkpoints.MARKER)):
                if signalled or self.args.save_strategy != "no":
                    self._save_checkpoint(self.model, trial=None)
                else:
                    self._keep_trained_weights()
            if signalled and self.graceful_stop.stopped_at is None:
                self.graceful_stop.stopped_at = self.state.global_step
            return result
        finally:
            self.graceful_stop.uninstall()

    def training_step(self, model, inputs, num_items_in_batch=None):
        empty = self._note_lost("train", inputs)
        # every process asks the others each step, unless images cannot be lost (features were cached up front)
        if self.lost_images["train"] or (self.args.world_size > 1 and "vision_embeds" not in inputs):
            self._check_lost_training_images(empty)
        if empty:  # one process, every image of this batch lost: nothing to learn from it
            return torch.zeros((), device=self.args.device)
        self.pairs_trained += len(inputs["input_ids"])
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            step = self.state.global_step + 1  # the optimizer step this batch belongs to, counted from 1
            raise NonFiniteLossError(
                nonfinite_loss_message(
                    float(loss.detach().float().sum()), step, self.state.epoch, self._get_output_dir(trial=None)
                )
            )
        return loss

    def _keep_trained_weights(self):
        """Without checkpoints (--save_strategy no), the trained weights alone (small: no optimizer state) and the
        trainer state as a complete checkpoint of the last step, where a rerun looks: a failed evaluation or
        export then costs no training. export() removes it once the exported model holds them."""
        folder = self._checkpoint_folder()
        if self.args.should_save:
            checkpoints.clear_for_save(folder)
            try:
                self.save_model(folder, _internal_call=True)
                self.state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))
                checkpoints.mark_complete(folder, step=self.state.global_step, weights_only=True)
            except Exception as error:  # noqa: BLE001 - as in _save_checkpoint: remove the partial folder, say why
                shutil.rmtree(folder, ignore_errors=True)
                raise checkpoints.CheckpointSaveError(
                    checkpoints.describe_save_failure(folder, self._get_output_dir(trial=None), error)
                ) from error
        self.accelerator.wait_for_everyone()

    def _checkpoint_folder(self, trial=None) -> str:
        return os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    def _save_checkpoint(self, model, trial):
        """Trainer's save, made safe to interrupt: the folder is cleared first, marked complete last, and older
        checkpoints are rotated out only after that."""
        run_dir, folder = self._get_output_dir(trial=trial), self._checkpoint_folder(trial)
        if self.args.should_save:
            checkpoints.clear_for_save(folder)
        self.accelerator.wait_for_everyone()  # nobody writes into the folder while it is being cleared
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # Trainer would rotate before the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every process's files (RNG states) are written
            if self.args.should_save:
                checkpoints.mark_complete(folder, step=self.state.global_step)
        except Exception as error:  # noqa: BLE001 - any failure leaves a partial folder: remove it, say what is intact
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise checkpoints.CheckpointSaveError(checkpoints.describe_save_failure(folder, run_dir, error)) from error
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            if self.args.push_to_hub:
                self._push_complete_checkpoint(folder)
            checkpoints.rotate_checkpoints(run_dir, limit, keep=[self.state.best_model_checkpoint])
