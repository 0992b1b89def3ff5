"""The main job and the caption CLI from a user's install (`pip install -e .`, no test extras), offline."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_run_captioning import assert_card_figures_trace_to_results

from conftest import PHOTOS, ROOT


pytestmark = [pytest.mark.runtime, pytest.mark.slow]


def test_the_main_job_and_the_caption_cli_run_from_a_runtime_only_install(runtime_python, tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    quick = [
        "--max_steps",
        "4",
        "--eval_on_start",
        "False",
        "--eval_steps",
        "4",
        "--save_steps",
        "4",
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "8",
        "--max_predict_samples",
        "8",
    ]
    job = subprocess.run(
        [
            runtime_python,
            str(ROOT / "run_captioning.py"),
            str(ROOT / "configs" / "embedded-tiny.json"),
            "--output_dir",
            str(tmp_path / "out"),
            *quick,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-5000:]
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert {"train_loss", "eval_rougeL", "test_rougeL", "test_cider"} <= set(results)
    assert_card_figures_trace_to_results(tmp_path / "out")  # the main job's model card tells the truth

    cli = Path(runtime_python).with_name("clipqwen-caption")
    captions = subprocess.run(
        [
            str(cli),
            str(tmp_path / "out"),
            str(PHOTOS),
            "--max_new_tokens",
            "5",
            "--output",
            str(tmp_path / "captions.jsonl"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert captions.returncode == 0, captions.stderr[-3000:]
    assert len((tmp_path / "captions.jsonl").read_text().splitlines()) == len(list(PHOTOS.glob("*.jpg")))
