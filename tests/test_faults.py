"""Faults during training: SIGKILL mid-epoch, a kill during a checkpoint save, a full disk, a NaN loss, SIGTERM.

Every scenario trains the same tiny run (16 embedded images, batch 4: 4 steps an epoch; 8 steps = 2 epochs,
constant learning rate, a checkpoint every 2 steps) and compares with one uninterrupted run: the same final
trainable weights and the same logged loss at every step, bit for bit, or within rounding (conftest.ROUNDING) where
the steps before a kill ran in a child process. Only the runs that must die are
subprocesses; everything else runs in-process to keep the file fast on a 2-core machine.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerState
from transformers.trainer_utils import get_last_checkpoint

import run_captioning
from clipqwen.training import checkpoints, preflight
from clipqwen.training.trainer import TRAINABLE_WEIGHTS, CaptionTrainer, nonfinite_loss_message

from conftest import ROOT, ROUNDING


MAX_STEPS = 8
FLAGS = [
    "--tiny_model",
    "--report_to",
    "none",
    "--per_device_train_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--dataloader_pin_memory",
    "False",
    "--dataset_name",
    "embedded",
    "--max_train_samples",
    "16",
    "--do_train",
    "--lr_scheduler_type",
    "constant",
    "--learning_rate",
    "1e-2",
    "--save_strategy",
    "steps",
    "--save_steps",
    "2",
    "--max_steps",
    str(MAX_STEPS),
    "--disable_tqdm",
    "True",
]


def args_for(out: Path) -> list[str]:
    return [*FLAGS, "--output_dir", str(out), "--feature_cache_dir", str(out.parent / "features")]


def run(out: Path, *extra):
    return run_captioning.main(run_captioning.parse_args([*args_for(out), *extra]))


# The killed runs: run_captioning in a child process, each optimizer step slowed down so the parent can catch
# it mid-epoch, or killed by itself (SIGKILL, no cleanup) in the middle of writing a checkpoint.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, os.getcwd())
    from transformers import Trainer
    from clipqwen.training.trainer import CaptionTrainer
    import run_captioning

    slow = float(os.environ.get("SLOW_STEP", "0"))
    training_step = CaptionTrainer.training_step
    def slowed(self, *args, **kwargs):
        time.sleep(slow)
        return training_step(self, *args, **kwargs)
    CaptionTrainer.training_step = slowed

    kill_in_save = int(os.environ.get("KILL_IN_SAVE_AT", "0"))
    save_optimizer = Trainer._save_optimizer_and_scheduler
    def torn(self, output_dir):
        if self.state.global_step == kill_in_save:  # half an optimizer.pt on disk, then the power goes
            with open(os.path.join(output_dir, "optimizer.pt"), "wb") as file:
                file.write(b"PK" + b"\\0" * 1000)
                file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return save_optimizer(self, output_dir)
    Trainer._save_optimizer_and_scheduler = torn

    run_captioning.main(run_captioning.parse_args(sys.argv[1:]))
""")


def start_child(out: Path, **env) -> subprocess.Popen:
    with open(out.parent / f"{out.name}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, *args_for(out)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **{key: str(value) for key, value in env.items()}},
        )


def child_log(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()


def losses(out: Path) -> dict[int, float]:
    state = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / TRAINABLE_WEIGHTS)


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Both killed runs, started together (each spends ~10 s importing) and in parallel with `straight`:
    "mid-epoch" is SIGKILLed from here as soon as checkpoint-6 (epoch 1.5) is complete, i.e. during step 7;
    "torn" SIGKILLs itself halfway through writing checkpoint-6."""
    base = tmp_path_factory.mktemp("killed")
    mid, torn = base / "mid-epoch", base / "torn"
    children = {
        "mid-epoch": (mid, start_child(mid, SLOW_STEP=0.3)),
        "torn": (torn, start_child(torn, KILL_IN_SAVE_AT=6)),
    }

    def kill_mid_epoch():
        marker, child = mid / "checkpoint-6" / checkpoints.MARKER, children["mid-epoch"][1]
        deadline = time.monotonic() + 300
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_mid_epoch, daemon=True)
    killer.start()
    yield {name: (out, child, killer) for name, (out, child) in children.items()}
    for _, child in children.values():
        if child.poll() is None:
            child.kill()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run everything is compared with."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    run(out)
    assert len(losses(out)) == MAX_STEPS
    return out


def assert_matches_straight(out: Path, straight: Path, *, killed_in_a_child: bool = False):
    """The same weights and losses at every step as `straight`: bit for bit when `out` ran in this process (resuming
    copies the checkpoint into a model built as `straight`'s was), within rounding (conftest.ROUNDING) when its steps
    before the fault ran in a child process. A lost or replayed step, optimizer state or data order moves them by
    orders of magnitude more."""
    tolerance = ROUNDING if killed_in_a_child else dict(rtol=0, atol=0)
    resumed, expected = weights(out / f"checkpoint-{MAX_STEPS}"), weights(straight / f"checkpoint-{MAX_STEPS}")
    assert resumed.keys() == expected.keys()
    for name, tensor in resumed.items():
        torch.testing.assert_close(
            tensor, expected[name], **tolerance, msg=lambda message, name=name: f"{name}: {message}"
        )
    resumed_losses, expected_losses = losses(out), losses(straight)
    assert resumed_losses.keys() == expected_losses.keys()  # every step, including those before the fault
    torch.testing.assert_close(
        torch.tensor(list(resumed_losses.values()), dtype=torch.float64),
        torch.tensor(list(expected_losses.values()), dtype=torch.float64),
        **tolerance,
    )


# ---- SIGKILL ---------------------------------------------------------------------------------------------------
def test_sigkill_mid_epoch_then_resume_gives_the_same_losses_and_weights(killed_runs, straight):
    out, child, killer = killed_runs["mid-epoch"]
    assert child.wait(timeout=300) == -signal.SIGKILL, child_log(out)[-3000:]
    killer.join()
    resumed_from = checkpoints.last_complete_checkpoint(out)
    step = int(resumed_from.rsplit("-", 1)[1])  # step 7 was running when the kill came
    assert step == 6, resumed_from  # epoch 1.5: the resumed run starts mid-epoch, in epoch 1
    assert not (out / "config.json").exists()  # the killed run never finished

    run(out)  # the same command again: resumes
    assert_matches_straight(out, straight, killed_in_a_child=True)


def test_a_kill_during_a_checkpoint_save_leaves_a_torn_folder_that_is_skipped(killed_runs, straight, caplog):
    out, child, _ = killed_runs["torn"]
    assert child.wait(timeout=300) == -signal.SIGKILL, child_log(out)[-3000:]
    torn = out / "checkpoint-6"
    assert (torn / TRAINABLE_WEIGHTS).exists() and not (torn / checkpoints.MARKER).exists()
    assert get_last_checkpoint(out) == str(torn)  # what Trainer alone would resume from, and crash on
    assert checkpoints.last_complete_checkpoint(out) == str(out / "checkpoint-4")

    with caplog.at_level("WARNING"):
        run(out)
    assert f"Skipping {torn}" in caplog.text and "save did not finish" in caplog.text
    assert_matches_straight(out, straight, killed_in_a_child=True)
    assert checkpoints.checkpoint_problem(torn) is None  # saved again, completely, on the way


# ---- disk full -------------------------------------------------------------------------------------------------
def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_says_so(straight, tmp_path, monkeypatch):
    out = tmp_path / "full"
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if str(path).endswith(os.path.join("checkpoint-6", "optimizer.pt")):
            Path(path).write_bytes(b"PK\x03\x04" + b"\0" * 100)  # what fitted before the disk filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as error:
        run(out)
    message = str(error.value)
    assert "checkpoint-6 failed because the disk is full" in message and "No space left on device" in message
    assert f"{out / 'checkpoint-4'}, is intact" in message and "rerun the same command" in message
    assert not (out / "checkpoint-6").exists()  # the partial folder is removed, freeing what it took
    assert checkpoints.last_complete_checkpoint(out) == str(out / "checkpoint-4")  # manifest and SHA-256 check out
    assert_same_weights(weights(out / "checkpoint-4"), weights(straight / "checkpoint-4"))


def test_a_disk_full_error_from_torch_writer_is_recognised(tmp_path):
    error = RuntimeError(
        "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"
    )
    message = checkpoints.describe_save_failure(tmp_path / "checkpoint-8", tmp_path, error)
    assert "because the disk is full" in message and "No complete checkpoint was saved before it" in message


# ---- NaN / inf loss ------------------------------------------------------------------------------------------------
def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoints(straight, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    compute_loss = CaptionTrainer.compute_loss

    def poisoned(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 6 else loss  # the batch of step 7

    monkeypatch.setattr(CaptionTrainer, "compute_loss", poisoned)
    with pytest.raises(SystemExit) as error:
        run(out, "--save_total_limit", "2")
    message = str(error.value)
    assert "loss is NaN at step 7" in message and f"last complete checkpoint is {out / 'checkpoint-6'}" in message
    assert checkpoints.last_complete_checkpoint(out) == str(out / "checkpoint-6")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # rotated, limit 2
    assert_same_weights(weights(out / "checkpoint-6"), weights(straight / "checkpoint-6"))


def test_the_message_for_an_infinite_loss(tmp_path):
    message = nonfinite_loss_message(float("inf"), 3, 0.5, tmp_path)
    assert "loss is infinite at step 3" in message and "No checkpoint was saved before it" in message


# ---- SIGTERM -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_saves_a_checkpoint_exits_cleanly_and_the_run_resumes_exactly(sig, straight, tmp_path, monkeypatch):
    out = tmp_path / "preempted"
    training_step = CaptionTrainer.training_step
    before = signal.getsignal(sig)

    def preempt(self, *args, **kwargs):
        if self.state.global_step == 4:  # during step 5: mid-epoch 1, not a save step
            os.kill(os.getpid(), sig)
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(CaptionTrainer, "training_step", preempt)
    result = run(out)  # returns normally: `python run_captioning.py` exits with status 0
    assert result == {"preempted_at_step": 5}
    assert checkpoints.last_complete_checkpoint(out) == str(out / "checkpoint-5")
    assert not (out / "config.json").exists() and not (out / "checkpoint-6").exists()  # no export, no more steps
    assert signal.getsignal(sig) is before  # the handler only lives while training

    monkeypatch.setattr(CaptionTrainer, "training_step", training_step)
    run(out)  # resumes from checkpoint-5 and finishes
    assert_matches_straight(out, straight)


def test_sigterm_after_the_last_step_still_leaves_a_checkpoint(tmp_path, monkeypatch):
    """Between the last step's end and the end of train() (the evaluation at the last step, say), with no
    checkpoint at that step yet: one is saved there, and the run still stops before evaluating and exporting."""
    out = tmp_path / "late"
    finalize = CaptionTrainer._finalize_training

    def signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return finalize(self, *args, **kwargs)

    monkeypatch.setattr(CaptionTrainer, "_finalize_training", signalled)
    assert run(out, "--save_strategy", "no", "--max_steps", "2") == {"preempted_at_step": 2}
    assert checkpoints.last_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert not (out / "config.json").exists()


# ---- checkpoint bookkeeping (no training) -------------------------------------------------------------------------
def fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / TRAINABLE_WEIGHTS).write_bytes(os.urandom(64))
    (checkpoint / "optimizer.pt").write_bytes(os.urandom(128))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        checkpoints.mark_complete(checkpoint, step)
    return checkpoint


def test_truncated_corrupted_or_unmarked_checkpoints_are_skipped(tmp_path):
    good = fake_checkpoint(tmp_path, 2)
    truncated = fake_checkpoint(tmp_path, 4)
    with open(truncated / "optimizer.pt", "r+b") as file:
        file.truncate(10)
    corrupted = fake_checkpoint(tmp_path, 6)
    data = bytearray((corrupted / TRAINABLE_WEIGHTS).read_bytes())
    data[0] ^= 0xFF
    (corrupted / TRAINABLE_WEIGHTS).write_bytes(bytes(data))
    unmarked = fake_checkpoint(tmp_path, 8, complete=False)
    assert "optimizer.pt has 10 bytes" in checkpoints.checkpoint_problem(truncated)
    assert "SHA-256" in checkpoints.checkpoint_problem(corrupted)
    assert "save did not finish" in checkpoints.checkpoint_problem(unmarked)
    assert checkpoints.last_complete_checkpoint(tmp_path) == str(good)
    with pytest.raises(
        checkpoints.IncompleteCheckpointError, match=rf"not a complete checkpoint.*newest complete one is {good}"
    ):
        checkpoints.check_resume_checkpoint(unmarked)


def test_checkpoints_from_before_the_marker_still_resume(tmp_path):
    """Folders written by plain Trainer or an older clipqwen have no manifest: trainer_state.json decides."""
    old = fake_checkpoint(tmp_path, 2, complete=False)
    torn = fake_checkpoint(tmp_path, 4, complete=False)
    (torn / "trainer_state.json").unlink()
    assert checkpoints.last_complete_checkpoint(tmp_path) == str(old)


def test_rotation_counts_only_complete_checkpoints_and_runs_after_the_marker(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 5, complete=False)  # torn by an earlier crash
    fake_checkpoint(tmp_path, 8, complete=False)  # being written
    checkpoints.rotate_checkpoints(tmp_path, 2, keep=[tmp_path / "checkpoint-2"])  # 2 is the best model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]


def test_resume_from_an_explicit_torn_checkpoint_is_refused(tmp_path):
    fake_checkpoint(tmp_path / "out", 2)
    torn = fake_checkpoint(tmp_path / "out", 4, complete=False)
    with pytest.raises(checkpoints.IncompleteCheckpointError, match="checkpoint-4: not a complete checkpoint"):
        run(tmp_path / "out", "--resume_from_checkpoint", str(torn))


# the straight run's last checkpoint alone, as a crash before its export leaves it
LAST_CHECKPOINT_ONLY = shutil.ignore_patterns("checkpoint-[0-7]", "run_complete.json", "config.json")


def test_an_output_folder_holding_a_run_of_another_setup_is_refused(straight, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(straight, out, ignore=LAST_CHECKPOINT_ONLY)
    with pytest.raises(preflight.PreflightError, match=r'--projector_type "mlp2x_gelu" → "linear"\)'):
        run(out, "--projector_type", "linear", "--max_steps", "10")  # the flags the run saved: named first
    (out / checkpoints.RUN_ARGUMENTS).unlink()  # a folder of an older clipqwen: the checkpoint's weights tell
    with pytest.raises(ValueError, match="trainable weights of another setup"):
        run(out, "--projector_type", "linear", "--max_steps", "10")


def test_checkpoint_weights_of_other_shapes_are_refused_naming_the_tensor(straight, tmp_path):
    """Same names, other shapes: two image tokens from the pooled embedding instead of eight."""
    out = tmp_path / "other-shapes"
    shutil.copytree(straight, out, ignore=LAST_CHECKPOINT_ONLY)
    flags = ("--num_pooled_image_tokens", "2", "--max_steps", "10")
    with pytest.raises(preflight.PreflightError, match=r"--num_pooled_image_tokens 8 → 2\)"):
        run(out, *flags)
    (out / checkpoints.RUN_ARGUMENTS).unlink()  # a folder of an older clipqwen: the checkpoint's weights tell
    with pytest.raises(SystemExit, match=r"projector.layers.2.bias has shape \(512,\), the model's has \(128,\)"):
        run(out, *flags)


def test_an_optimizer_state_of_other_shapes_is_refused_before_it_reaches_the_optimizer(straight, tmp_path):
    """A valid manifest around an optimizer.pt of another setup: fused AdamW would write past its buffers."""
    other = tmp_path / "other"
    run(other, "--num_pooled_image_tokens", "2", "--max_steps", "2", "--save_steps", "2")
    out = tmp_path / "mixed"
    shutil.copytree(straight, out, ignore=LAST_CHECKPOINT_ONLY)
    shutil.copy(other / "checkpoint-2" / "optimizer.pt", out / "checkpoint-8" / "optimizer.pt")
    checkpoints.mark_complete(out / "checkpoint-8", step=8)
    with pytest.raises(
        SystemExit,
        match=r"optimizer's exp_avg of parameter 1 has shape \(128, 64\), "
        r"the model's parameter \(512, 64\)",
    ):
        run(out, "--max_steps", "10")


def test_a_failed_export_leaves_the_last_checkpoint_and_the_same_command_exports_it(straight, tmp_path, monkeypatch):
    from processing_clipqwen import ClipQwenProcessor

    out = tmp_path / "export-fails"
    save_pretrained = ClipQwenProcessor.save_pretrained

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ClipQwenProcessor, "save_pretrained", disk_full)
    with pytest.raises(
        SystemExit, match=r"exporting .* failed .*No space left on device.*checkpoint-8.*rerun the same command"
    ):
        run(out, "--save_steps", "3")  # steps 3 and 6 by --save_steps, 8 because it is the last
    assert not (out / "config.json").exists() and not list(out.glob(".export-*"))  # nothing half-written stays
    assert checkpoints.last_complete_checkpoint(out) == str(out / "checkpoint-8")

    monkeypatch.setattr(ClipQwenProcessor, "save_pretrained", save_pretrained)
    metrics = run(out, "--save_steps", "3")  # resumes at the last step: no training, only the export
    assert (out / "model.safetensors").exists() and (out / "run_complete.json").exists()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == MAX_STEPS
    exported = load_file(out / "model.safetensors")
    assert torch.equal(
        exported["adapter.layers.0.weight"],
        weights(straight / "checkpoint-8")["model.multi_modal_projector.layers.0.weight"],
    )
    assert "train_samples" in metrics


def too_large(path):
    """What a file-size limit (`ulimit -f`) makes safetensors raise; it removes the part it wrote."""
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: File too large (os error 27)")


def disk_full(path):
    Path(path).write_bytes(b"\0" * 100)
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as file.write raises it: no file name


@pytest.mark.parametrize(
    "fault, failing, says",
    [
        (too_large, "model.safetensors", "File too large (os error 27)"),
        (disk_full, "README.md", "No space left on device"),
        (disk_full, "trainer_state.json", "No space left on device"),
    ],
    ids=["size limit at the model", "disk full at the card", "disk full at the state after training"],
)
def test_an_export_that_fails_at_any_file_keeps_the_training_without_checkpoints(
    fault, failing, says, straight, tmp_path, monkeypatch
):
    """--save_strategy no: the trained weights are on disk before the export writes anything, the failure is one
    `error:` line naming the file, the OS error, what to do and where the weights are, and the same command then
    exports those weights without training."""
    import transformers.modeling_utils
    from huggingface_hub import ModelCard

    out = tmp_path / "no-checkpoints"
    real_save_file, real_card_save = transformers.modeling_utils.safe_save_file, ModelCard.save

    def save_file(tensors, filename, *args, **kwargs):
        if Path(filename).name == failing:
            raise fault(filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    def card_save(self, path):
        if Path(path).name == failing:
            raise fault(path)
        return real_card_save(self, path)

    def save_state(self, path):
        if Path(path) == out / failing:  # the run's, not the checkpoint's
            raise fault(path)
        return real_save_state(self, path)

    real_save_state = TrainerState.save_to_json
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    monkeypatch.setattr(ModelCard, "save", card_save)
    monkeypatch.setattr(TrainerState, "save_to_json", save_state)
    with pytest.raises(SystemExit) as error:
        run(out, "--save_strategy", "no")
    message, kept = str(error.value), out / f"checkpoint-{MAX_STEPS}"
    assert message.startswith("error: ") and "\n" not in message, message
    assert f"writing {failing}" in message and says in message, message
    assert f"trained weights are saved in {kept}" in message and "rerun the same command" in message, message
    assert not (out / "config.json").exists() and not list(out.glob(".export-*"))  # nothing half-written stays
    assert checkpoints.last_complete_checkpoint(out) == str(kept)
    trained = weights(kept)
    assert_same_weights(trained, weights(straight / f"checkpoint-{MAX_STEPS}"))

    monkeypatch.undo()
    monkeypatch.setattr(CaptionTrainer, "training_step", lambda *args, **kwargs: pytest.fail("trained again"))
    run(out, "--save_strategy", "no")  # the same command: exports, never trains
    assert (out / "run_complete.json").exists() and (out / failing).exists()
    exported = load_file(out / "model.safetensors")
    projector = "model.multi_modal_projector."
    assert_same_weights(
        {name[len(projector) :]: exported[f"adapter.{name[len(projector) :]}"] for name in trained},
        {name[len(projector) :]: tensor for name, tensor in trained.items()},
    )
    assert not kept.exists()  # --save_strategy no: once exported, the weights' safety copy goes
