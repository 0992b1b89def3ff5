"""CaptionTrainer: HF Trainer plus what captioning needs and the base class lacks.

- Generation-based evaluation: after the usual validation loss, captions are generated for every image of
  the split (sharded over processes, gathered once) and scored against all references.
- Small checkpoints: only the trainable weights (adapter, LoRA, unfrozen parts) and the optimizer state;
  the frozen backbones are reloaded from their source on resume. The final `save_model()` still writes a
  complete, self-contained model folder.
"""

import logging
import os
import time

import safetensors.torch
import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .metrics import compute_caption_metrics

logger = logging.getLogger(__name__)

TRAINABLE_WEIGHTS = "trainable_weights.safetensors"


class CaptionTrainer(Trainer):
    def __init__(self, *args, generation_datasets=None, generation_collator=None, generation_kwargs=None,
                 small_checkpoints: bool = True, **kwargs):
        """generation_datasets: {metric prefix ("eval", "test"): one row per image with `captions`}."""
        super().__init__(*args, **kwargs)
        self.generation_datasets = generation_datasets or {}
        self.generation_collator = generation_collator
        self.generation_kwargs = generation_kwargs or {}
        self.small_checkpoints = small_checkpoints
        self.predictions = {}  # prefix -> [{"image_id", "caption", "references"}], from the last evaluation

    # ---- evaluation ----------------------------------------------------------------------------------
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
        dataset = self.generation_datasets.get(metric_key_prefix)
        if dataset is not None:
            start = time.perf_counter()
            captions, rows = self.generate_captions(dataset)
            references = [dataset[row]["captions"] for row in rows]
            scores = compute_caption_metrics(captions, references)
            scores["generation_seconds"] = round(time.perf_counter() - start, 2)
            output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in scores.items()})
            self.predictions[metric_key_prefix] = [
                {"image_id": dataset[row]["image_id"], "caption": caption, "references": refs}
                for row, caption, refs in zip(rows, captions, references)
            ]
        return output

    @torch.no_grad()
    def generate_captions(self, dataset) -> tuple[list[str], list[int]]:
        """Captions for every row of `dataset`, in gathered order, and the row each one belongs to."""
        dataset = dataset.add_column("row_index", list(range(len(dataset))))
        loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.generation_collator,
                            num_workers=self.args.dataloader_num_workers)
        loader = self.accelerator.prepare(loader)  # each process takes its shard
        model = self.accelerator.unwrap_model(self.model)  # DDP has no generate(); the wrapped module does
        was_training = model.training
        model.eval()
        processor = self.generation_collator.processor
        pad_id = processor.caption_end_token_id
        captions, rows = [], []
        for batch in loader:
            row_index = batch.pop("row_index")
            with self.accelerator.autocast():
                generated = model.generate(**batch, **self.generation_kwargs)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            new_tokens = self.accelerator.pad_across_processes(new_tokens, dim=1, pad_index=pad_id)
            # gather_for_metrics drops the samples repeated to even out the last batch across processes
            new_tokens, row_index = self.accelerator.gather_for_metrics((new_tokens, row_index))
            captions += processor.batch_decode(new_tokens)
            rows += row_index.tolist()
        model.train(was_training)
        return captions, rows

    # ---- small checkpoints -----------------------------------------------------------------------------
    def save_model(self, output_dir=None, _internal_call=False):
        is_checkpoint = _internal_call and output_dir and os.path.basename(output_dir).startswith(PREFIX_CHECKPOINT_DIR)
        if not (is_checkpoint and self.small_checkpoints):
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
                f"unexpected {sorted(set(state) - expected)[:5]}). Resume with the same model, adapter, LoRA and "
                "freezing arguments, or start a new --output_dir."
            )
        model.load_state_dict(state, strict=False)
        logger.info("Loaded %d trainable tensors from %s", len(state), path)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if best and os.path.isfile(os.path.join(best, TRAINABLE_WEIGHTS)):
            return self._load_from_checkpoint(best)
        return super()._load_best_model()
