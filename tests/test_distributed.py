"""Two processes on this CPU (gloo), launched the way users launch on GPUs: accelerate launch."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_two_process_ddp_trains_evaluates_and_writes_once(tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "run_captioning.py",
        "--tiny_model", "--freeze_language_model", "False", "--dataset_name", "embedded", "--max_train_samples", "16",
        "--max_eval_samples", "7", "--do_train", "--do_eval", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "2", "--max_new_tokens", "4", "--report_to", "none", "--save_strategy", "no",
        "--output_dir", str(out), "--feature_cache_dir", str(tmp_path / "features"), "--dataloader_pin_memory", "False",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "distributed parallel" in result.stdout + result.stderr or "distributed" in result.stdout
    metrics = json.loads((out / "all_results.json").read_text())
    # 7 images over 2 processes: the padded duplicate is dropped, each image scored once
    predictions = [json.loads(line) for line in (out / "predictions_validation.jsonl").read_text().splitlines()]
    assert len(predictions) == 7 and len({p["image_id"] for p in predictions}) == 7
    assert metrics["eval_num_images"] == 7 and "eval_rougeL" in metrics and "train_loss" in metrics
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()


@pytest.mark.parametrize("name, distributed", [("one_gpu_bf16.yaml", "NO"), ("multi_gpu_bf16.yaml", "MULTI_GPU")])
def test_the_shipped_accelerate_configs_load_and_the_readme_shows_them(name, distributed):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / name))
    assert config.mixed_precision == "bf16" and config.distributed_type == distributed and not config.use_cpu
    assert f"accelerate launch --config_file configs/accelerate/{name}" in (ROOT / "README.md").read_text()
