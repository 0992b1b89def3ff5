"""Bad values and busy or full folders fail before the first step, in seconds, naming the flag; a finished run is
evaluated and exported again, never trained on; one run at a time per output folder."""

import json
import shutil
import time
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file

import run_captioning
from clipqwen.training import preflight

from conftest import TINY as QUICK


TINY = [
    *QUICK,
    "--per_device_eval_batch_size",
    "8",
    "--max_new_tokens",
    "4",
    "--dataset_name",
    "embedded",
    "--max_train_samples",
    "16",
    "--max_eval_samples",
    "4",
    "--max_predict_samples",
    "4",
]


def run(out, *flags):
    args = [*TINY, "--output_dir", str(out), "--feature_cache_dir", str(out.parent / "features"), *flags]
    return run_captioning.main(run_captioning.parse_args(args))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_new_tokens", "0"], "--max_new_tokens 0: use 1 to 512"),
        (["--num_beams", "200000"], "--num_beams 200000: use 1 to 64"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: use a number >= 1"),
        (["--per_device_eval_batch_size", "-1"], "--per_device_eval_batch_size -1: use a number >= 1"),
        (["--max_train_samples", "0"], "--max_train_samples 0: use a number >= 1"),
        (
            ["--max_caption_length", "600"],
            "--max_caption_length 600: with 8 image token\\(s\\) and a 2-token prompt it exceeds the decoder's 512 "
            "positions; use at most 502",
        ),
    ],
)
def test_bad_values_fail_before_training_naming_the_flag(flags, message, tmp_path):
    start = time.monotonic()
    with pytest.raises(preflight.PreflightError, match=message):
        run(tmp_path / "out", "--do_train", "--do_eval", "--max_steps", "1", *flags)
    assert time.monotonic() - start < 30 and not (tmp_path / "out" / "checkpoint-1").exists()


def test_an_output_dir_that_is_a_file_or_not_writable_fails_at_once(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(preflight.PreflightError, match="is a file; give a folder"):
        run(tmp_path / "file", "--do_train", "--max_steps", "1")
    with pytest.raises(preflight.PreflightError, match="is not writable"):
        run(tmp_path / "file" / "below", "--do_train", "--max_steps", "1")  # as a read-only mount fails: mkdir refused


def test_a_disk_without_room_for_a_checkpoint_and_the_export_fails_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**20, 9 * 2**20, 2**20))  # 1 MiB free
    with pytest.raises(preflight.PreflightError, match=r"1 MiB free, the run needs about \d+ MiB"):
        run(tmp_path / "out", "--do_train", "--max_steps", "1")


def test_two_runs_on_one_output_folder_the_second_is_refused(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with preflight.OutputFolderLock(out):  # a run in progress
        with pytest.raises(preflight.PreflightError, match=r"is in use by another run \(pid \d+\)"):
            run(out, "--do_train", "--max_steps", "1")
    run(out, "--do_train", "--max_steps", "1")  # free again once that run ends


def test_rerunning_a_finished_run_evaluates_and_exports_without_training(tmp_path):
    """The same command again, to add --do_predict: the exported weights stay those of the finished run."""
    out = tmp_path / "finished"
    run(out, "--do_train", "--do_eval", "--max_steps", "3", "--freeze_language_model", "False")
    trained = load_file(out / "model.safetensors")
    state = json.loads((out / "trainer_state.json").read_text())
    metrics = run(
        out, "--do_train", "--do_eval", "--do_predict", "--max_steps", "3", "--freeze_language_model", "False"
    )
    assert "train_loss" not in metrics and "test_rougeL" in metrics
    again = load_file(out / "model.safetensors")
    assert trained.keys() == again.keys() and all(torch.equal(trained[k], again[k]) for k in trained)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == state["global_step"] == 3
    assert "| optimizer steps | 3 |" in (out / "README.md").read_text()


def test_a_rerun_with_other_model_or_data_flags_is_refused_naming_each_before_anything_loads(tmp_path, monkeypatch):
    out = tmp_path / "finished"
    run(out, "--do_train", "--max_steps", "2")
    exported = load_file(out / "model.safetensors")

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_captioning, "build_model_and_processor", never)
    with pytest.raises(preflight.PreflightError) as error:
        run(out, "--do_train", "--max_steps", "6", "--num_pooled_image_tokens", "2", "--caption_mode", "all")
    message = str(error.value)
    assert "--num_pooled_image_tokens 8 → 2" in message and '--caption_mode "random" → "all"' in message
    assert "--max_steps 2 →" not in message  # a longer run alone would continue: not the change to name
    assert "--overwrite_output_dir" in message and "another --output_dir" in message
    with pytest.raises(preflight.PreflightError, match="--max_steps 2 → 1"):  # shorter than what was trained
        run(out, "--do_train", "--max_steps", "1")
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(exported[k], again[k]) for k in exported)  # the finished run is untouched


def test_a_longer_rerun_of_a_finished_run_trains_on_from_its_last_checkpoint(tmp_path, caplog):
    out = tmp_path / "longer"
    flags = ("--do_train", "--save_strategy", "steps", "--save_steps", "2", "--freeze_language_model", "False")
    run(out, *flags, "--max_steps", "2")
    first = load_file(out / "model.safetensors")
    with caplog.at_level("INFO"):
        metrics = run(out, *flags, "--max_steps", "4")
    assert f"Training the finished run further, as asked, from {out / 'checkpoint-2'}" in caplog.text
    assert "train_loss" in metrics and json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert json.loads((out / "run_complete.json").read_text())["global_step"] == 4
    longer = load_file(out / "model.safetensors")
    assert any(not torch.equal(first[k], longer[k]) for k in first)  # trained on, and exported again
    assert json.loads((out / "run_arguments.json").read_text())["--max_steps"] == 4


def test_a_longer_rerun_of_a_finished_run_without_checkpoints_is_refused(tmp_path):
    out = tmp_path / "no-checkpoints"
    run(out, "--do_train", "--max_steps", "1")
    with pytest.raises(preflight.PreflightError, match=r"kept no checkpoint .*--overwrite_output_dir"):
        run(out, "--do_train", "--max_steps", "2")


def test_no_caption_is_ever_empty_and_the_export_says_so(tmp_path):
    out = tmp_path / "untrained"  # an untrained model whose first greedy token is often the end of the text
    run(out, "--do_eval")
    predictions = [json.loads(line) for line in (out / "predictions_validation.jsonl").read_text().splitlines()]
    assert all(row["caption"] for row in predictions)
    assert json.loads((out / "generation_config.json").read_text())["min_new_tokens"] == 1
