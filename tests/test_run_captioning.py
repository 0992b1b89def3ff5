"""run_captioning.py end to end on tiny models and small data, offline."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

import run_captioning
from clipqwen.data.sources import FLICKR30K_FEATURES
from clipqwen.training.trainer import TRAINABLE_WEIGHTS

from conftest import PHOTOS, ROOT
from conftest import TINY as QUICK


TINY = [
    *QUICK,
    "--per_device_eval_batch_size",
    "8",
    "--max_new_tokens",
    "6",
    "--logging_steps",
    "1",
]


def run(
    output_dir,
    *flags,
    data=(
        "--dataset_name",
        "embedded",
        "--max_train_samples",
        "16",
        "--max_eval_samples",
        "8",
        "--max_predict_samples",
        "8",
    ),
):
    features = Path(output_dir).parent / "features"
    args = [*TINY, *data, "--output_dir", str(output_dir), "--feature_cache_dir", str(features), *flags]
    return run_captioning.main(run_captioning.parse_args(args))


def photo_rows():
    return [json.loads(line) for line in (PHOTOS / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short embedded run with train, eval and predict, shared by the output tests."""
    out = tmp_path_factory.mktemp("run") / "embedded"
    metrics = run(
        out,
        "--do_train",
        "--do_eval",
        "--do_predict",
        "--max_steps",
        "4",
        "--train_sampling_strategy",
        "group_by_length",
    )
    return out, metrics


def test_export_is_a_complete_model_folder_with_predictions_and_card(trained):
    out, metrics = trained
    for name in (
        "model.safetensors",
        "config.json",
        "modeling_clipqwen.py",
        "processor_config.json",
        "README.md",
        "predictions_validation.jsonl",
        "predictions_test.jsonl",
        "training_curves.png",
        "all_results.json",
    ):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"image_id", "caption", "references"} <= set(rows[0]) and len(rows[0]["references"]) == 5
    for key in ("eval_rougeL", "eval_bleu4", "eval_cider", "eval_loss", "test_rougeL", "test_cider", "train_loss"):
        assert key in metrics


def test_the_folder_that_would_be_uploaded_loads_in_a_fresh_process(trained, tmp_path):
    """What --push_to_hub uploads is the exported folder: it must load with trust_remote_code from elsewhere."""
    from test_remote_code import load_in_fresh_process

    out, _ = trained
    child = load_in_fresh_process(out, sorted(PHOTOS.glob("*.jpg"))[0], tmp_path / "elsewhere")
    assert child["module"].startswith("transformers_modules")  # the folder's own code, not the project's


def test_model_card_holds_the_real_metrics(trained):
    out, metrics = trained
    card = (out / "README.md").read_text()
    assert f"{metrics['test_rougeL']:.4f}" in card and f"{metrics['eval_cider']:.4f}" in card
    assert "trust_remote_code=True" in card and "revision" in card
    assert "training_curves.png" in card and "base_model:" not in card  # a tiny random model has no base model


def test_model_card_tells_how_the_run_really_went(trained):
    """A --max_steps run: real steps and epochs, the precision Accelerate ran, versions, Hub metric types."""
    from huggingface_hub import ModelCard

    out, _ = trained
    card = ModelCard.load(out / "README.md")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert "| optimizer steps | 4 |" in card.text and f"| epochs | {round(state['epoch'], 2)} |" in card.text
    assert "| precision | fp32 |" in card.text and "| devices | 1 |" in card.text
    assert "| total batch size | 4 |" in card.text
    assert "| optimizer | adamw_torch_fused" in card.text and "| warm-up | 0 steps |" in card.text
    assert f"transformers {transformers.__version__}" in card.text and "caption_metrics" in card.text
    results = card.data.to_dict()["model-index"][0]["results"]
    assert {m["type"] for r in results for m in r["metrics"]} == {"rouge", "bleu", "cider"}


def assert_card_figures_trace_to_results(out: Path):
    """Every figure in the model card's tables and model-index equals its source: all_results.json,
    trainer_state.json, or the run's flags (run_arguments.json). Shared with the main job's runtime test."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    results = json.loads((out / "all_results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    flags = json.loads((out / "run_arguments.json").read_text())
    rows = {}
    for line in card.text.splitlines():
        if line.startswith("| ") and not line.startswith(("| phase ", "| split ", "| hyper-parameter ")):
            name, *cells = (cell.strip() for cell in line.strip().strip("|").split("|"))
            rows[name] = cells
    per_device, accumulation = flags["--per_device_train_batch_size"], flags["--gradient_accumulation_steps"]
    total_batch = per_device * int(rows["devices"][0]) * accumulation
    expected = {
        "learning rate": flags["--learning_rate"],
        "weight decay": flags["--weight_decay"],
        "optimizer steps": state["global_step"],
        "epochs": round(state["epoch"], 2),
        "batch size per device": per_device,
        "gradient accumulation": accumulation,
        "total batch size": total_batch,
        "max caption tokens": flags["--max_caption_length"],
        "seed": flags["--seed"],
    }
    for name, value in expected.items():
        assert rows.pop(name) == [str(value)], name
    assert state["train_batch_size"] * accumulation == total_batch  # the devices, checked
    rows.pop("devices")
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split in rows:
            keys = ("num_images", "bleu1", "bleu2", "bleu3", "bleu4", "cider", "rougeL", "loss", "image_reliance")
            values = [results[f"{prefix}_{key}"] for key in (*keys, "distinct_captions")]
            assert rows.pop(split) == [str(values[0])] + [f"{value:.4f}" for value in values[1:]], split
    for phase in [name for name in rows if f"time_{name.replace(' ', '_')}_seconds" in results]:
        seconds, throughput = rows.pop(phase)
        key = f"time_{phase.replace(' ', '_')}"
        assert float(seconds) == results[f"{key}_seconds"], phase
        rate = results.get(f"{key}_per_second")
        assert throughput == ("–" if rate is None else f"{rate} {'pairs' if phase == 'training' else 'images'}/s")
    # the rate is the pairs trained over the unrounded seconds (0.70 s in the table may be 0.695)
    rate = results["train_pairs"] / results["time_training_seconds"]
    assert results["time_training_per_second"] == pytest.approx(rate, rel=0.01)
    # what is left: names and modes, and the optimizer's and warm-up's settings as the training arguments give them
    assert set(rows) == {"optimizer", "scheduler", "warm-up", "precision", "caption mode", "batches", "LoRA"}, rows
    trainable, total = results["train_trainable_parameters"], results["train_total_parameters"]
    assert f"Trainable parameters: {trainable:,} of {total:,}." in card.text
    for result in card.data.to_dict()["model-index"][0]["results"]:
        prefix = "test" if result["dataset"]["split"] == "test" else "eval"
        for metric in result["metrics"]:
            key = {"rouge": "rougeL", "bleu": "bleu4", "cider": "cider"}[metric["type"]]
            assert metric["value"] == round(results[f"{prefix}_{key}"], 4)


def test_every_figure_in_the_model_card_traces_to_a_results_file(trained):
    out, metrics = trained
    assert_card_figures_trace_to_results(out)
    # 4 steps of 4 pairs: the throughput counts what trained, not the data set's size
    assert metrics["train_pairs"] == 16
    card = (out / "README.md").read_text()
    assert "refs/convert/parquet" not in card and "at commit" not in card  # generated data has no revision


def test_a_card_of_local_data_names_its_files_content_hash(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for row in photo_rows()[:4]:
        Image.open(PHOTOS / row["file_name"]).save(folder / row["file_name"])
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": r["file_name"], "captions": r["captions"]}) + "\n" for r in photo_rows()[:4])
    )
    out = tmp_path / "local"
    run(out, "--do_train", "--max_steps", "1", data=("--train_dir", str(folder), "--caption_column", "captions"))
    from clipqwen.publishing.model_card import content_sha256

    card = (out / "README.md").read_text()
    assert f"**local data** (SHA-256 of photos: `{content_sha256([folder])}`)" in card
    assert "revision" not in card.split("model-index")[-1].split("---")[0] and "at commit" not in card
    copy = tmp_path / "elsewhere" / "photos"
    shutil.copytree(folder, copy)
    assert content_sha256([copy]) == content_sha256([folder])  # the files, not where they are
    (copy / "metadata.jsonl").write_text("")
    assert content_sha256([copy]) != content_sha256([folder])


def test_phase_timings_are_in_all_results_and_the_card(trained):
    out, metrics = trained
    results = json.loads((out / "all_results.json").read_text())
    for phase in (
        "model_loading",
        "data_preparation",
        "feature_cache",
        "training",
        "evaluation_validation",
        "evaluation_test",
        "export",
    ):
        assert results[f"time_{phase}_seconds"] >= 0 and metrics[f"time_{phase}_seconds"] >= 0, phase
    assert results["time_feature_cache_per_second"] > 0 and results["time_evaluation_test_per_second"] > 0
    card = (out / "README.md").read_text()
    assert "| phase | seconds | throughput |" in card and "| feature cache |" in card and "| training |" in card


def test_generation_config_holds_the_decoding_behind_the_scores(tmp_path):
    out = tmp_path / "beams"
    run(out, "--do_eval", "--num_beams", "3", "--max_new_tokens", "7")
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["num_beams"] == 3 and saved["max_new_tokens"] == 7
    assert "num_beams=3" in (out / "README.md").read_text()


@pytest.mark.parametrize("cuda_bf16", [True, False])
def test_precision_is_what_accelerate_runs(cuda_bf16, tmp_path, monkeypatch):
    """No precision flag, as in the README's commands: bf16 on a GPU with bf16 (faked here; Accelerate's bf16
    autocast runs on the CPU too), fp32 on the CPU. Checked on the Accelerator itself, then in the card."""
    import transformers.training_args

    from clipqwen import precision
    from clipqwen.training.trainer import CaptionTrainer

    monkeypatch.setattr(precision, "is_torch_bf16_gpu_available", lambda: cuda_bf16)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: cuda_bf16)
    seen, dtypes, train = [], [], CaptionTrainer.train

    def recording(self, *args, **kwargs):
        seen.append(self.accelerator.mixed_precision)
        base = self.model.model
        parts = (base.vision_tower, base.language_model, base.multi_modal_projector)
        dtypes.append([{p.dtype for p in part.parameters()} for part in parts])
        return train(self, *args, **kwargs)

    monkeypatch.setattr(CaptionTrainer, "train", recording)
    run(tmp_path / "out", "--do_train", "--max_steps", "1")
    expected = "bf16" if cuda_bf16 else "fp32"
    assert seen == ["bf16" if cuda_bf16 else "no"]
    # a bf16 run keeps the frozen towers in bf16 (half the bytes) and trains the projector's fp32 weights
    frozen = torch.bfloat16 if cuda_bf16 else torch.float32
    assert dtypes == [[{frozen}, {frozen}, {torch.float32}]]
    assert f"| precision | {expected} |" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("unfrozen, lora", [(False, False), (True, False), (False, True)])
def test_what_trains_is_fp32_and_what_is_frozen_takes_the_runs_dtype(unfrozen, lora):
    flags = ["--freeze_language_model", str(not unfrozen)] + (["--lora_r", "4"] if lora else [])
    model_args = run_captioning.parse_args([*TINY, "--output_dir", "unused", *flags])[0]
    model, _ = run_captioning.build_model_and_processor(model_args, torch.bfloat16)
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    frozen = {
        name: p.dtype for name, p in model.named_parameters() if not p.requires_grad and "original_module" not in name
    }  # peft's untouched copy of the projector
    assert set(trainable.values()) == {torch.float32} and set(frozen.values()) == {torch.bfloat16}
    assert any("multi_modal_projector" in name for name in trainable)
    assert any("language_model" in name or "lm_head" in name for name in trainable) == (unfrozen or lora)
    assert any("vision_tower" in name for name in frozen)


def test_lora_with_an_unfrozen_vision_tower_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="--lora_r with --freeze_vision_model False is not supported"):
        run(tmp_path / "out", "--do_train", "--lora_r", "4", "--freeze_vision_model", "False")


def test_assembling_from_two_local_backbone_folders(tmp_path):
    """The --vision_model_name_or_path / --text_model_name_or_path path, with folders instead of Hub ids."""
    from transformers import AutoTokenizer, CLIPVisionModelWithProjection, Qwen3ForCausalLM

    from clipqwen.backbones.assemble import tower_image_processor
    from clipqwen.tiny import bundled_tokenizer_dir, tiny_config

    config = tiny_config()
    CLIPVisionModelWithProjection(config.vision_config).save_pretrained(tmp_path / "clip")
    tower_image_processor().save_pretrained(tmp_path / "clip")
    qwen = Qwen3ForCausalLM(config.text_config)
    qwen.save_pretrained(tmp_path / "qwen")
    AutoTokenizer.from_pretrained(bundled_tokenizer_dir()).save_pretrained(tmp_path / "qwen")
    out = tmp_path / "out"
    args = [a for a in TINY if a != "--tiny_model"]
    metrics = run_captioning.main(
        run_captioning.parse_args(
            [
                *args,
                "--vision_model_name_or_path",
                str(tmp_path / "clip"),
                "--text_model_name_or_path",
                str(tmp_path / "qwen"),
                "--dataset_name",
                "embedded",
                "--max_train_samples",
                "8",
                "--max_eval_samples",
                "4",
                "--do_train",
                "--do_eval",
                "--max_steps",
                "1",
                "--output_dir",
                str(out),
                "--feature_cache_dir",
                str(tmp_path / "features"),
            ]
        )
    )
    assert "eval_rougeL" in metrics
    from modeling_clipqwen import ClipQwenForConditionalGeneration

    exported = ClipQwenForConditionalGeneration.from_pretrained(out)
    assert torch.equal(
        exported.model.language_model.layers[0].mlp.up_proj.weight, qwen.model.layers[0].mlp.up_proj.weight
    )
    card = (out / "README.md").read_text()
    assert str(tmp_path / "clip") in card and str(tmp_path / "qwen") in card


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    flags = [
        "--do_train",
        "--lr_scheduler_type",
        "constant",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
        "--freeze_language_model",
        "False",
        "--learning_rate",
        "1e-3",
    ]
    run(tmp_path / "straight", *flags, "--max_steps", "6")
    run(tmp_path / "resumed", *flags, "--max_steps", "3")
    assert (tmp_path / "resumed" / "checkpoint-3" / TRAINABLE_WEIGHTS).exists()
    run(tmp_path / "resumed", *flags, "--max_steps", "6", "--overwrite_output_dir", "True")  # picks up checkpoint-3
    straight = load_file(tmp_path / "straight" / "checkpoint-6" / TRAINABLE_WEIGHTS)
    resumed = load_file(tmp_path / "resumed" / "checkpoint-6" / TRAINABLE_WEIGHTS)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_a_run_trains_with_the_prompt_it_saves_and_a_given_model_keeps_its_own(trained, tmp_path, monkeypatch):
    """The prompt is part of what a model learned: the preset's for a new model, the saved one for a model trained
    further, '' when asked; the batches the trainer sees carry the same prompt the exported processor will use."""
    from clipqwen.data.collator import CaptionCollator

    def saved_prompt(out):
        return json.loads((out / "processor_config.json").read_text())["prompt"]

    seen = []
    collate = CaptionCollator.__call__
    monkeypatch.setattr(
        CaptionCollator, "__call__", lambda self, rows: seen.append(self.processor.prompt) or collate(self, rows)
    )
    out = trained[0]
    assert saved_prompt(out) == "Image:<|image_pad|>"  # the default preset's (clipcap)
    run(tmp_path / "further", "--model_name_or_path", str(out), "--do_train", "--max_steps", "1")
    assert saved_prompt(tmp_path / "further") == "Image:<|image_pad|>" and set(seen) == {"Image:<|image_pad|>"}
    seen.clear()
    run(tmp_path / "none", "--do_train", "--max_steps", "1", "--prompt", "")
    assert saved_prompt(tmp_path / "none") == "" and set(seen) == {""}
    seen.clear()
    run(tmp_path / "seed", "--do_train", "--max_steps", "1", "--preset", "seed_exact")
    assert saved_prompt(tmp_path / "seed") == "" and set(seen) == {""}
    assert json.loads((tmp_path / "seed" / "config.json").read_text())["projector_type"] == "linear"


def test_checkpoints_hold_only_trainable_weights(tmp_path):
    run(tmp_path / "out", "--do_train", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()  # nobody can load it as a complete model by mistake
    weights = load_file(checkpoint / TRAINABLE_WEIGHTS)
    # the MLP, named as the model's parameters (the exported folder uses the saved layout)
    assert set(weights) == {
        f"model.multi_modal_projector.layers.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")
    }
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "trainer_state.json").exists()


def test_an_output_folder_holding_a_model_of_unknown_state_is_refused(trained, tmp_path):
    """A model without run_complete.json (an older clipqwen, or copied in by hand) and no checkpoint: never trained
    over."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(trained[0], out, ignore=shutil.ignore_patterns("run_complete.json", "run_arguments.json"))
    with pytest.raises(ValueError, match="already holds a model .* --overwrite_output_dir"):
        run(out, "--do_train", "--max_steps", "1")


def test_lora_train_save_reload_merge_gives_the_same_captions(tmp_path):
    from peft import PeftModel
    from transformers import set_seed

    from clipqwen.tiny import bundled_processor, tiny_config
    from modeling_clipqwen import ClipQwenForConditionalGeneration

    out = tmp_path / "lora"
    run(out, "--do_train", "--max_steps", "3", "--lora_r", "4", "--learning_rate", "5e-2", "--seed", "7")
    merged = ClipQwenForConditionalGeneration.from_pretrained(out).eval()
    set_seed(7)  # the tiny base is rebuilt exactly as the run built it
    base = ClipQwenForConditionalGeneration(tiny_config())
    with_lora = PeftModel.from_pretrained(base, out / "lora").eval()
    processor = bundled_processor()
    batch = processor(images=[Image.open(p) for p in sorted(PHOTOS.glob("*.jpg"))[:3]])
    with torch.no_grad():
        a = merged.generate(**batch, max_new_tokens=6, min_new_tokens=6)
        b = with_lora.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(a, b)
    assert not torch.equal(
        merged.model.language_model.layers[0].self_attn.q_proj.weight,
        base.model.language_model.layers[0].self_attn.q_proj.base_layer.weight,
    )


def write_jsonl_and_csv(tmp_path):
    """The CC-BY photos under custom column names: JSONL with a caption list, CSV with one caption per row."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = photo_rows()
    for row in rows:
        (folder / row["file_name"]).write_bytes((PHOTOS / row["file_name"]).read_bytes())
    with open(tmp_path / "train.jsonl", "w") as file:
        for row in rows:
            file.write(json.dumps({"picture": f"photos/{row['file_name']}", "descriptions": row["captions"]}) + "\n")
    with open(tmp_path / "val.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["picture", "descriptions"])
        for row in rows[:3]:
            for caption in row["captions"]:
                writer.writerow([f"photos/{row['file_name']}", caption])
    return rows


def test_jsonl_and_csv_with_custom_column_names(tmp_path):
    rows = write_jsonl_and_csv(tmp_path)
    metrics = run(
        tmp_path / "out",
        "--do_train",
        "--do_eval",
        "--max_steps",
        "2",
        data=(
            "--train_file",
            str(tmp_path / "train.jsonl"),
            "--validation_file",
            str(tmp_path / "val.csv"),
            "--image_column",
            "picture",
            "--caption_column",
            "descriptions",
        ),
    )
    assert metrics["eval_num_images"] == 3 and metrics["train_samples"] == len(rows)
    lines = (tmp_path / "out" / "predictions_validation.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    # CSV rows grouped
    assert sorted(p["references"] for p in predictions) == sorted(row["captions"] for row in rows[:3])


def test_imagefolder_with_custom_caption_column(tmp_path):
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as file:
        for row in photo_rows():
            (folder / row["file_name"]).write_bytes((PHOTOS / row["file_name"]).read_bytes())
            file.write(json.dumps({"file_name": row["file_name"], "sentences": row["captions"]}) + "\n")
    metrics = run(
        tmp_path / "out",
        "--do_train",
        "--do_eval",
        "--max_steps",
        "1",
        data=("--train_dir", str(folder), "--validation_dir", str(folder), "--caption_column", "sentences"),
    )
    assert metrics["eval_num_images"] == 8


def test_a_missing_column_is_a_clear_error(tmp_path):
    write_jsonl_and_csv(tmp_path)
    with pytest.raises(ValueError, match=r"no column 'caption'.*--image_column/--caption_column"):
        run(
            tmp_path / "out",
            "--do_train",
            "--max_steps",
            "1",
            data=("--train_file", str(tmp_path / "train.jsonl"), "--image_column", "picture"),
        )


def test_a_corrupt_image_is_skipped_and_counted_and_training_goes_on(tmp_path, caplog):
    rows = write_jsonl_and_csv(tmp_path)
    (tmp_path / "photos" / rows[1]["file_name"]).write_bytes(b"<html>404 Not Found</html>")
    truncated = (PHOTOS / rows[2]["file_name"]).read_bytes()
    (tmp_path / "photos" / rows[2]["file_name"]).write_bytes(truncated[: len(truncated) // 3])
    with caplog.at_level("WARNING"):
        metrics = run(
            tmp_path / "out",
            "--do_train",
            "--max_steps",
            "2",
            data=(
                "--train_file",
                str(tmp_path / "train.jsonl"),
                "--image_column",
                "picture",
                "--caption_column",
                "descriptions",
            ),
        )
    assert metrics["train_samples"] == len(rows) - 2
    log = caplog.text
    assert "skipping 2 unreadable image(s) of 8" in log
    assert rows[1]["file_name"] in log and rows[2]["file_name"] in log


def test_flickr30k_loading_path_on_a_local_parquet_with_the_hub_schema(tmp_path):
    """nlphuji/flickr30k's parquet conversion: image, caption (5), sentids, split (Karpathy), img_id, filename."""
    import datasets

    rows = photo_rows()
    splits = ["train", "train", "train", "train", "val", "val", "test", "test"]
    table = {
        "image": [{"bytes": (PHOTOS / r["file_name"]).read_bytes(), "path": r["file_name"]} for r in rows],
        "caption": [r["captions"] for r in rows],
        "sentids": [[str(5 * i + k) for k in range(5)] for i in range(len(rows))],
        "split": splits,
        "img_id": [str(i) for i in range(len(rows))],
        "filename": [r["file_name"] for r in rows],
    }
    features = FLICKR30K_FEATURES
    folder = tmp_path / "flickr30k" / "TEST"
    folder.mkdir(parents=True)
    datasets.Dataset.from_dict(table, features=features).to_parquet(folder / "0000.parquet")
    metrics = run(
        tmp_path / "out",
        "--do_train",
        "--do_eval",
        "--do_predict",
        "--max_steps",
        "1",
        data=("--dataset_name", str(tmp_path / "flickr30k"), "--dataset_revision", "None"),
    )  # ids default to `filename`
    assert metrics["train_samples"] == 4 and metrics["eval_num_images"] == 2 and metrics["test_num_images"] == 2
    lines = (tmp_path / "out" / "predictions_test.jsonl").read_text().splitlines()
    ids = {json.loads(line)["image_id"] for line in lines}
    assert ids == {rows[6]["file_name"], rows[7]["file_name"]}


def test_caption_cli_on_a_folder_of_photos(trained, tmp_path):
    out, _ = trained
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipqwen.inference.cli",
            str(out),
            str(PHOTOS),
            "--num_beams",
            "2",
            "--max_new_tokens",
            "5",
            "--output",
            str(tmp_path / "captions.jsonl"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert sorted(Path(line["file"]).name for line in lines) == sorted(p.name for p in PHOTOS.glob("*.jpg"))
    assert all(isinstance(line["caption"], str) for line in lines)


def test_a_failed_final_push_keeps_the_run_and_says_how_to_push_again(tmp_path, monkeypatch):
    from clipqwen import hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("the Hub went away")

    monkeypatch.setattr(hub, "prepare_repo", lambda repo_id, **kwargs: repo_id)  # the repository exists
    monkeypatch.setattr(hub, "push_export", unreachable)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"the Hub went away.*Everything is saved in .*python -m clipqwen.hub"):
        run(out, "--do_train", "--max_steps", "1", "--push_to_hub", "--hub_model_id", "you/clipqwen-test")
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def test_a_run_reports_image_reliance_and_distinct_captions_and_warns_when_the_image_is_ignored(tmp_path, caplog):
    """A tiny frozen random decoder cannot learn from the image (docs/evidence.md): its reliance stays near zero."""
    with caplog.at_level("WARNING"):
        metrics = run(tmp_path / "out", "--do_train", "--max_steps", "1", "--do_eval")
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    for key in ("eval_image_reliance", "eval_distinct_captions", "eval_bleu1", "eval_bleu4"):
        assert results[key] == metrics[key], key
    assert abs(metrics["eval_image_reliance"]) < 0.05 and 0 < metrics["eval_distinct_captions"] <= 1
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert "barely uses the image" in warnings[-1] and "seed_exact" in warnings[-1]  # the run's last word
