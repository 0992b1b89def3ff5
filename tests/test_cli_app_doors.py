"""The caption CLI, the demo's request handler and model folders get the same guards as training: bad flags and
inputs are refused up front in one line, model folders with missing weights are refused, uploads are capped, the
demo serves only the operator's models (with no hint of which other folders exist), and no caption is empty. Both
decode as the model's generation_config says, unless the user sets a flag or a control."""

import copy
import json
import os
import re
import shutil
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

from clipqwen import hub
from clipqwen.inference import captioning, loading
from clipqwen.inference import cli as caption_cli
from clipqwen.inference.captioning import CAPTION_GENERATION
from clipqwen.inference.loading import ModelLoadError, load_clipqwen
from clipqwen.inference.packed_linear import decoding_path
from clipqwen.presets import DEFAULT_PRESET, LAYOUTS
from clipqwen.tiny import bundled_processor, tiny_config
from modeling_clipqwen import ClipQwenForConditionalGeneration

from conftest import PHOTOS


PHOTO = PHOTOS / "000000159269.jpg"
QUICK = ["--max_new_tokens", "3"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    torch.manual_seed(0)
    ClipQwenForConditionalGeneration(tiny_config()).save_pretrained(folder)
    bundled_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompted_model(tmp_path_factory):
    """The tiny model saved with the default layout's prompt (`Image:` before the placeholders), as run_captioning
    exports a clipcap model."""
    folder = tmp_path_factory.mktemp("model") / "prompted"
    torch.manual_seed(0)
    ClipQwenForConditionalGeneration(tiny_config()).save_pretrained(folder)
    bundled_processor(prompt=LAYOUTS[DEFAULT_PRESET]["prompt"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def eos_first_model(tmp_path_factory):
    """A model whose first greedy token is end-of-text, as after some projector-only trainings: the projector outputs
    zeros, and the end token's output row points along the decoder's last hidden state for that input."""
    torch.manual_seed(0)
    model, processor = ClipQwenForConditionalGeneration(tiny_config()).eval(), bundled_processor()
    eos = model.config.text_config.eos_token_id
    with torch.no_grad():
        for layer in model.model.multi_modal_projector.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        last = []
        hook = model.lm_head.register_forward_hook(lambda m, args, out: last.append(args[0][0, -1]))
        inputs = processor(images=[Image.open(PHOTO)])
        model(**inputs)
        hook.remove()
        model.lm_head.weight[eos] = last[0] * (50 / last[0].dot(last[0]))
        ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert ids[0, inputs["input_ids"].shape[1] :].tolist() == [eos]  # the control: without the fix, an empty caption
    folder = tmp_path_factory.mktemp("model") / "eos-first"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def copy_model(folder, tmp_path, name="copy"):
    return shutil.copytree(folder, tmp_path / name)


def with_decoding(folder, tmp_path, name, **settings):
    """A copy of a model folder whose generation_config.json also holds `settings`, as run_captioning exports them."""
    folder = copy_model(folder, tmp_path, name)
    config = GenerationConfig.from_pretrained(folder)
    config.update(**settings)
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def two_beam_model(saved_model, tmp_path_factory):
    return with_decoding(saved_model, tmp_path_factory.mktemp("model"), "two-beams", num_beams=2, max_new_tokens=5)


@pytest.fixture(scope="module")
def sampling_model(saved_model, tmp_path_factory):
    settings = dict(do_sample=True, temperature=0.5, top_p=0.8, max_new_tokens=4)
    return with_decoding(saved_model, tmp_path_factory.mktemp("model"), "sampling", **settings)


DECODING = ("num_beams", "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p")


def decoding_asked_for(model, kwargs) -> dict:
    """The decoding a generate() call asked for: its generation_config (else the model's) and keyword settings."""
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{name: value for name, value in kwargs.items() if name in DECODING})
    return {name: getattr(config, name) for name in DECODING}


def spy_on_generate(model, monkeypatch) -> list[dict]:
    """The decoding of each later generate() call of `model`, in order."""
    asked, generate = [], model.generate
    monkeypatch.setattr(
        model, "generate", lambda **kwargs: asked.append(decoding_asked_for(model, kwargs)) or generate(**kwargs)
    )
    return asked


def cli(capsys, *args):
    """(exit status, stdout, stderr without the progress bar and the weight-loading bar) of clipqwen-caption."""
    status = caption_cli.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    err = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+/\d+ \[", line)]  # tqdm's bars
    return status, out, err


# ---- the caption CLI -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--batch_size", "0"),
        ("--num_beams", "0"),
        ("--num_beams", "65"),
        ("--max_new_tokens", "0"),
        ("--max_new_tokens", "513"),
        ("--max_new_tokens", "1e9"),
        ("--top_p", "0"),
        ("--temperature", "0"),
        ("--temperature", "nan"),
    ],
)
def test_cli_refuses_out_of_range_flags_at_parse_time_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        caption_cli.parse_args(["some/model", str(PHOTO), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and flag in err[0], err


@pytest.mark.parametrize("damage", ["no tensors", "random bytes"])
def test_cli_reports_a_broken_model_folder_in_one_line_with_exit_status_1(damage, saved_model, tmp_path, capsys):
    folder = copy_model(saved_model, tmp_path)
    if damage == "no tensors":
        save_file({}, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        (folder / "model.safetensors").write_bytes(os.urandom(4096))
    status, out, err = cli(capsys, folder, PHOTO, *QUICK)
    assert status == 1 and out == "" and len(err) == 1, err
    assert err[0].startswith("clipqwen-caption: error: ") and str(folder) in err[0]


@pytest.mark.parametrize("alias", ["same path", "symlink", "hard link"])
def test_cli_refuses_an_output_that_is_one_of_its_input_images(alias, saved_model, tmp_path, capsys):
    photo = tmp_path / "photos" / "photo.jpg"
    photo.parent.mkdir()
    shutil.copy(PHOTO, photo)
    output = tmp_path / "captions.jsonl"
    if alias == "same path":
        output = photo
    elif alias == "symlink":
        output.symlink_to(photo)
    else:
        os.link(photo, output)
    status, out, err = cli(capsys, saved_model, photo.parent, "--output", output, *QUICK)
    assert status == 2 and len(err) == 1 and "is one of the input images" in err[0], err
    assert photo.read_bytes() == PHOTO.read_bytes()  # untouched


@pytest.mark.parametrize(
    "case, message",
    [
        ("a fifo", "is not a regular file"),
        ("an empty folder", "No image files in"),
        ("a folder as --output", "not a file in an existing folder"),
        ("--output in a missing folder", "not a file in an existing folder"),
        ("no readable image", "none of the 1 file(s) could be read as an image"),
        ("a model that is a file", "is a file, not a model folder"),
    ],
)
def test_cli_refuses_odd_inputs_in_one_line(case, message, saved_model, tmp_path, capsys):
    """Each one used to end in a traceback, a misleading message, or exit status 0 with nothing captioned."""
    model, inputs, flags = saved_model, [PHOTO], []
    if case == "a fifo":
        os.mkfifo(tmp_path / "photo.jpg")
        inputs = [tmp_path / "photo.jpg"]
    elif case == "an empty folder":
        inputs = [tmp_path]
    elif case == "a folder as --output":
        flags = ["--output", tmp_path]
    elif case == "--output in a missing folder":
        flags = ["--output", tmp_path / "missing" / "captions.jsonl"]
    elif case == "no readable image":
        (tmp_path / "notes.jpg").write_text("not a photo")
        inputs = [tmp_path / "notes.jpg"]
    else:
        model = PHOTO
    status, out, err = cli(capsys, model, *inputs, *flags, *QUICK)
    assert status in (1, 2) and out == "" and message in err[-1], err
    assert err[-1].startswith("clipqwen-caption: error:"), err
    assert status == (1 if case == "a model that is a file" else 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_refuses_a_cuda_device_on_a_machine_without_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        caption_cli.parse_args(["some/model", str(PHOTO), "--device", "cuda"])
    assert exit_info.value.code == 2 and "argument --device: cuda: this machine has 0 CUDA" in capsys.readouterr().err


def test_cli_writes_any_file_name_as_valid_utf8(saved_model, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = [b"caf\xe9 latin-1.jpg", "写真 café.jpg".encode(), b"plain.jpg"]  # the first is not UTF-8
    for name in names:
        shutil.copy(PHOTO, os.path.join(os.fsencode(folder), name))
    output = tmp_path / "captions.jsonl"
    status, _, err = cli(capsys, saved_model, folder, "--output", output, *QUICK)
    assert status == 0, err
    rows = [json.loads(line) for line in output.read_bytes().decode("utf-8").splitlines()]  # strict UTF-8
    assert sorted(os.path.basename(os.fsencode(row["file"])) for row in rows) == sorted(names)  # exact bytes back
    assert any("写真 café.jpg" in line for line in output.read_text(encoding="utf-8").splitlines())  # not \u-escaped
    assert all(row["caption"] for row in rows)

    # Printed instead (pytest's captured stdout is strict UTF-8, like a terminal's): the odd byte shows as \xe9.
    status, out, err = cli(capsys, saved_model, folder, *QUICK)
    assert status == 0, err
    assert "caf\\xe9 latin-1.jpg\t" in out and "写真 café.jpg\t" in out and len(out.splitlines()) == 3


def test_cli_prints_a_name_holding_a_newline_or_a_tab_on_one_line(saved_model, tmp_path, capsys):
    shutil.copy(PHOTO, tmp_path / "two\nlines\tand a tab.jpg")
    status, out, err = cli(capsys, saved_model, tmp_path, *QUICK)
    assert status == 0 and len(out.splitlines()) == 1 and out.startswith(f"{tmp_path}/two\\nlines\\tand a tab.jpg\t")


def test_cli_a_recursive_glob_through_a_symlink_loop_lists_each_photo_once(tmp_path):
    shutil.copy(PHOTO, tmp_path / "photo.jpg")
    (tmp_path / "up").symlink_to(".")  # "**" follows it until the path is too long for the system (~40 levels)
    assert caption_cli.expand_inputs([f"{tmp_path}/**/*.jpg"]) == [tmp_path / "photo.jpg"]


def test_cli_names_every_file_of_a_folder_it_skips_or_passes_over_with_its_real_reason(saved_model, tmp_path, capsys):
    """A FIFO, a folder, a link to a device and a link to a text file, all named *.jpg, beside one photo: each is
    skipped with what it is (the scan used to drop the first three unsaid), and files not named as images are listed
    as passed over."""
    shutil.copy(PHOTO, tmp_path / "photo.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    (tmp_path / "notes.jpg").symlink_to(notes)
    status, out, err = cli(capsys, saved_model, tmp_path, *QUICK)
    assert status == 0 and [line.split("\t")[0] for line in out.splitlines()] == [str(tmp_path / "photo.jpg")]
    skipped = {line.split(": ")[1].split("Cannot load image ")[-1]: line for line in err if line.startswith("skipped")}
    assert len(skipped) == 4, err
    assert "a FIFO (named pipe), not a regular file" in skipped[str(tmp_path / "fifo.jpg")]
    assert "a directory, not a regular file" in skipped[str(tmp_path / "folder.jpg")]
    assert (
        "a device, not a regular file (the name is a symbolic link to /dev/zero)"
        in skipped[str(tmp_path / "zero.jpg")]
    )
    assert (
        f"not recognise it as an image (unknown format or random bytes) (the name is a symbolic link to {notes})"
        in (skipped[str(tmp_path / "notes.jpg")])
    )
    assert any("passed over 1 file(s) not named as images: notes.txt" in line for line in err), err
    assert err[-1] == "4 unreadable file(s) skipped.", err


def test_cli_names_an_input_too_long_for_the_file_system(saved_model, tmp_path, capsys):
    name = tmp_path / ("x" * 300 + ".jpg")
    status, out, err = cli(capsys, saved_model, name, *QUICK)
    assert status == 2 and out == "", err
    assert "the file name is too long for the file system (304 characters" in err[-1], err


def test_cli_keeps_finished_batches_when_a_later_batch_fails(saved_model, tmp_path, capsys, monkeypatch):
    model, processor = load_clipqwen(str(saved_model))
    generate, calls = model.generate, []

    def failing_second_batch(**kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nsecond line")
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", failing_second_batch)
    monkeypatch.setattr(captioning, "load_clipqwen", lambda *args, **kwargs: (model, processor))
    output = tmp_path / "captions.jsonl"
    status, _, err = cli(capsys, saved_model, PHOTOS, "--batch_size", "2", "--output", output, *QUICK)
    assert status == 1
    assert err == [
        f"{PHOTOS}: passed over 2 file(s) not named as images: README.md, metadata.jsonl",  # the folder's notes
        f"clipqwen-caption: captioning on cpu in {decoding_path(model)}",  # which path runs
        "clipqwen-caption: error: CUDA out of memory. Tried to allocate 20.00 GiB second line",
    ]
    assert len(output.read_text().splitlines()) == 2  # the first batch


def test_cli_with_an_unreachable_hub_fails_fast_in_one_line(tmp_path, capsys, unreachable_hub, caplog):
    """No HF_HUB_OFFLINE and no Hub (a closed port): the probe run_captioning uses, not ~30 s of retries."""
    start = time.monotonic()
    status, out, err = cli(capsys, "someone/clipqwen-flickr30k", PHOTO, *QUICK)
    assert time.monotonic() - start < 10
    assert (
        status == 1
        and len(err) == 1
        and err[0].startswith("clipqwen-caption: error: Could not fetch config.json of `someone/clipqwen-flickr30k`")
    ), err
    assert "does not answer" in caplog.text and "working offline" in caplog.text
    assert_process_still_online()


def assert_process_still_online():
    """What `unreachable_hub` set (online mode) is still so: no library call switched the whole process offline."""
    import datasets.config
    from huggingface_hub import constants

    assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False


def test_loading_with_an_unreachable_hub_probes_nothing_and_changes_nothing(unreachable_hub, monkeypatch):
    """The Hub decision is the entry point's (`local_files_only`): the library neither probes nor goes offline."""
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda *args: pytest.fail("the library probed the Hub"))
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="Could not fetch config.json of `someone/clipqwen-flickr30k`"):
        load_clipqwen("someone/clipqwen-flickr30k", local_files_only=True)
    assert time.monotonic() - start < 10
    assert_process_still_online()


def test_the_app_decides_on_an_unreachable_hub_at_startup(app, saved_model, unreachable_hub, monkeypatch):
    """Served Hub ids then load from the local cache only (local_files_only), for this demo, not the process."""
    built = []

    class Built(Exception):
        """Raised instead of serving."""

    def build_demo(*args):
        built.append(args)
        raise Built

    monkeypatch.setattr(app, "build_demo", build_demo)
    with pytest.raises(Built):
        app.main([str(saved_model), "--allowed_models", "someone/clipqwen-flickr30k"])
    assert built[0][0].local_files_only is True
    assert_process_still_online()


def test_cli_never_writes_an_empty_caption(eos_first_model, tmp_path, capsys):
    status, out, err = cli(capsys, eos_first_model, PHOTO, *QUICK)
    assert status == 0, err
    name, caption = out.rstrip("\n").split("\t")
    assert caption.strip(), out


def cli_decoding(capsys, monkeypatch, folder, *flags) -> dict:
    """The decoding clipqwen-caption asks generate() for when it captions one photo with `folder`'s model."""
    asked = []

    def load(*args, **kwargs):
        model, processor = load_clipqwen(*args, **kwargs)
        asked.append(spy_on_generate(model, monkeypatch))
        return model, processor

    monkeypatch.setattr(captioning, "load_clipqwen", load)
    status, out, err = cli(capsys, folder, PHOTO, *flags)
    assert status == 0 and len(out.splitlines()) == 1, err
    return asked[0][0]


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], dict(num_beams=2, max_new_tokens=5)),
        (["--num_beams", "1"], dict(num_beams=1, max_new_tokens=5)),
        (["--max_new_tokens", "3"], dict(num_beams=2, max_new_tokens=3)),
        (["--do_sample", "--top_p", "0.5"], dict(num_beams=1, do_sample=True, top_p=0.5, temperature=None)),
        (["--temperature", "0.5"], dict(num_beams=2, do_sample=None, temperature=None)),  # greedy: no temperature
    ],
)
def test_cli_decodes_as_the_models_generation_config_unless_a_flag_says_otherwise(
    flags, expected, two_beam_model, capsys, monkeypatch
):
    decoding = cli_decoding(capsys, monkeypatch, two_beam_model, *flags)
    assert {name: decoding[name] for name in expected} == expected
    assert decoding["min_new_tokens"] == CAPTION_GENERATION["min_new_tokens"]  # never an empty caption


def test_cli_sampling_model_keeps_its_settings_and_no_do_sample_turns_it_off(sampling_model, capsys, monkeypatch):
    decoding = cli_decoding(capsys, monkeypatch, sampling_model)
    assert decoding == dict(
        num_beams=1, max_new_tokens=4, min_new_tokens=1, do_sample=True, temperature=0.5, top_p=0.8
    )
    assert cli_decoding(capsys, monkeypatch, sampling_model, "--no-do_sample")["do_sample"] is False


def test_cli_falls_back_on_the_project_decoding_for_a_model_that_sets_none(saved_model, capsys, monkeypatch):
    assert GenerationConfig.from_pretrained(saved_model).max_new_tokens is None  # saved in code, not by the script
    decoding = cli_decoding(capsys, monkeypatch, saved_model)
    assert {name: decoding[name] for name in CAPTION_GENERATION} == CAPTION_GENERATION


# ---- model folders -------------------------------------------------------------------------------------------------
def drop_projector(state):
    return {key: value for key, value in state.items() if not key.startswith("adapter.")}


def reshape_projector(state):
    return state | {"adapter.layers.0.weight": torch.zeros(3, 3)}


@pytest.mark.parametrize(
    "damage, message",
    [
        (None, r"has a ClipQwen config.json but no weights \(no model.safetensors"),
        (lambda state: {}, r"missing 68 of the 68 tensors it needs"),
        (
            drop_projector,
            r"missing 4 of the 68 tensors it needs \(adapter.layers.0.bias, adapter.layers.0.weight, "
            r"adapter.layers.2.bias and 1 more\)",
        ),
        (
            reshape_projector,
            r"1 tensor\(s\) of the wrong shape \(adapter.layers.0.weight \[3, 3\] instead of \[64, 32\]\)",
        ),
    ],
    ids=["no safetensors", "0 tensors", "no projector", "wrong shape"],
)
def test_a_model_folder_with_missing_weights_is_refused(damage, message, saved_model, tmp_path):
    folder = copy_model(saved_model, tmp_path)
    weights = folder / "model.safetensors"
    if damage is None:
        weights.unlink()
    else:
        save_file(damage(load_file(weights)), weights, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=message):
        load_clipqwen(str(folder))


def test_a_weights_index_naming_files_outside_the_folder_is_refused(saved_model, tmp_path):
    folder = copy_model(saved_model, tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    save_file(state, tmp_path / "elsewhere.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {key: "../elsewhere.safetensors" for key in state}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"names files outside the model folder \(../elsewhere.safetensors\)"):
        load_clipqwen(str(folder))


def test_a_tied_output_layer_may_be_absent_from_the_file(saved_model):
    from safetensors import safe_open

    with safe_open(saved_model / "model.safetensors", framework="pt") as weights:
        assert "language_model.lm_head.weight" not in weights.keys()  # saved once, as the input embeddings
    model, _ = load_clipqwen(str(saved_model))
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


# ---- the demo's request handler ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app():
    pytest.importorskip("gradio")
    import app  # the repository root is on sys.path (conftest)

    return app


def run_app(app, files, choice, served, **settings):
    """caption() as the Caption button calls it: greedy, 3 new tokens, no prefix; `settings` are app.Serving's."""
    return app.caption(files, choice, app.BEAM, 1, 0.7, 0.9, 3, "", serving=app.Serving(served, **settings))


def test_app_serves_only_its_models_and_answers_alike_for_existing_and_missing_ones(app, saved_model, tmp_path):
    served = app.served_models(str(saved_model), "", [])
    other = copy_model(saved_model, tmp_path, "another-clipqwen")  # a real model, not served
    not_clipqwen = tmp_path / "bert"
    not_clipqwen.mkdir()
    (not_clipqwen / "config.json").write_text(json.dumps({"model_type": "bert"}))
    answers = {
        name: run_app(app, [str(PHOTO)], name, served)[1:]
        for name in (
            str(other),
            str(not_clipqwen),
            str(tmp_path / "missing"),
            str(tmp_path),
            "/etc/passwd",
            "someone/clipqwen",
            "someone/clipqwen@main",
            "",
            "../" + saved_model.name,
        )
    }
    assert len(set(answers.values())) == 1, answers
    text, status = answers[str(other)]
    assert text == "" and status.startswith("⚠️ This demo serves only") and str(saved_model) in status

    gallery, text, status = run_app(app, [str(PHOTO)], str(saved_model), served)
    assert status.startswith("Captioned 1 image") and text.startswith(f"{PHOTO.name}: ")


def test_app_served_models_pin_revisions(app, saved_model):
    served = app.served_models("you/clipqwen", "abc123", [str(saved_model), "you/other@v2", "you/third"])
    assert served == {
        "you/clipqwen@abc123": ("you/clipqwen", "abc123"),
        str(saved_model): (str(saved_model), None),
        "you/other@v2": ("you/other", "v2"),
        "you/third": ("you/third", None),
    }


def test_app_decodes_no_image_beyond_the_count_and_byte_limits(app, saved_model, tmp_path, monkeypatch):
    photos = sorted(str(path) for path in PHOTOS.glob("*.jpg"))
    decoded = []
    monkeypatch.setattr(
        captioning, "load_image", lambda file, name: decoded.append(name) or Image.open(file).convert("RGB")
    )
    served = app.served_models(str(saved_model), "", [])

    _, text, status = run_app(app, photos, str(saved_model), served, max_images=3)
    assert len(decoded) == 3 and len(text.splitlines()) == 3
    assert f"{len(photos) - 3} image(s) left out" in status and "at most 3 images" in status

    decoded.clear()
    budget = sum(os.path.getsize(path) for path in photos[:2]) + 1  # two photos fit, the third does not
    _, text, status = run_app(app, photos, str(saved_model), served, max_request_mb=budget / 2**20)
    assert len(decoded) == 2 and f"{len(photos) - 2} image(s) left out" in status


def test_app_refuses_a_prompt_prefix_over_its_cap(app, saved_model):
    served = app.served_models(str(saved_model), "", [])
    long = "a photo of " * 1000
    gallery, text, status = app.caption(
        [str(PHOTO)], str(saved_model), app.BEAM, 1, 0.7, 0.9, 3, long, serving=app.Serving(served)
    )
    assert gallery == [] and status == (
        f"⚠️ The prompt prefix has {len(long):,} characters; at most {app.MAX_PREFIX_CHARS} are allowed."
    )


def test_app_caption_is_the_clis_without_the_prompt(app, prompted_model, capsys):
    """A model saved with the default prompt: the demo shows what clipqwen-caption writes for the same photo and
    decoding, and neither shows the prompt."""
    served = app.served_models(str(prompted_model), "", [])
    gallery, text, status = run_app(app, [str(PHOTO)], str(prompted_model), served)
    assert status.startswith("Captioned 1 image"), status
    status, out, err = cli(capsys, prompted_model, PHOTO, "--num_beams", "1", *QUICK)
    assert status == 0, err
    assert out == f"{PHOTO}\t{gallery[0][1]}\n" and text == f"{PHOTO.name}: {gallery[0][1]}"
    assert not gallery[0][1].startswith("Image"), gallery


def test_app_never_shows_an_empty_caption(app, eos_first_model):
    served = app.served_models(str(eos_first_model), "", [])
    gallery, text, status = run_app(app, [str(PHOTO)], str(eos_first_model), served)
    assert status.startswith("Captioned") and gallery[0][1].strip(), (text, status)


def test_app_controls_start_from_the_models_generation_config(app, two_beam_model, sampling_model, saved_model):
    served = app.served_models(str(two_beam_model), "", [str(sampling_model), str(saved_model)])
    demo = app.build_demo(app.Serving(served))
    # built before any model loads: the project's decoding, until the page's load event reads the model's
    start = {c["props"].get("elem_id"): c["props"].get("value") for c in demo.config["components"] if "props" in c}
    assert start["num-beams"] == CAPTION_GENERATION["num_beams"] and start["decoding"] == app.BEAM
    assert start["max-new-tokens"] == CAPTION_GENERATION["max_new_tokens"]
    triggers = [trigger for dependency in demo.config["dependencies"] for _, trigger in dependency["targets"]]
    assert "load" in triggers

    def controls(folder):
        updates = app.model_decoding(str(folder), serving=app.Serving(served))
        names = ("decoding", "num_beams", "temperature", "top_p", "max_new_tokens")
        return {name: update.get("value") for name, update in zip(names, updates)}, updates[-1]

    neutral = dict(temperature=1.0, top_p=1.0)  # the model sets none: its distribution as it is
    assert controls(two_beam_model) == (dict(decoding=app.BEAM, num_beams=2, max_new_tokens=5) | neutral, "")
    assert controls(sampling_model)[0] == dict(
        decoding=app.SAMPLING, num_beams=1, temperature=0.5, top_p=0.8, max_new_tokens=4
    )
    fallback = dict(decoding=app.BEAM, num_beams=1, max_new_tokens=CAPTION_GENERATION["max_new_tokens"]) | neutral
    assert controls(saved_model) == (fallback, "")
    updates = app.model_decoding("/etc", serving=app.Serving(served))
    unchanged, status = updates[:5], updates[5]
    assert unchanged == [{"__type__": "update"}] * 5 and status.startswith("⚠️ This demo serves only")


def test_app_captions_with_its_controls_over_the_models_settings(app, two_beam_model, monkeypatch):
    served = app.served_models(str(two_beam_model), "", [])
    model, _ = app.get_model(str(two_beam_model), app.Serving(served))
    asked = spy_on_generate(model, monkeypatch)
    serving = app.Serving(served)
    app.caption([str(PHOTO)], str(two_beam_model), app.BEAM, 3, 0.7, 0.9, 4, "", serving=serving)
    app.caption([str(PHOTO)], str(two_beam_model), app.SAMPLING, 3, 0.7, 0.9, 4, "", serving=serving)
    assert [(a["num_beams"], a["max_new_tokens"], a["do_sample"], a["min_new_tokens"]) for a in asked] == [
        (3, 4, False, 1),
        (1, 4, True, 1),
    ]
    assert (asked[1]["temperature"], asked[1]["top_p"]) == (0.7, 0.9)


# ---- precision: fp32, bf16, int8 weight-only (clipqwen.precision) ------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_cli_captions_in_each_precision(precision, saved_model, capsys):
    if precision == "int8":
        pytest.importorskip("optimum.quanto")
    second = sorted(PHOTOS.glob("*.jpg"))[1]
    status, out, err = cli(capsys, saved_model, PHOTO, second, "--precision", precision, *QUICK)
    lines = out.splitlines()
    assert status == 0 and [line.split("\t")[0] for line in lines] == [str(PHOTO), str(second)]
    assert all(line.split("\t")[1].strip() for line in lines), lines
    assert len(err) == 1 and err[0].startswith(f"clipqwen-caption: captioning on cpu in {precision}"), err  # the path


def test_cli_refuses_an_unknown_precision_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        caption_cli.parse_args(["model", str(PHOTO), "--precision", "int4"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "--precision: invalid choice: 'int4'" in err and "'fp32', 'bf16', 'int8'" in err


def test_cli_int8_without_its_library_names_the_extra_before_loading(saved_model, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # what a missing package looks like to import
    monkeypatch.setattr(loading, "read_model_type", lambda *args, **kwargs: pytest.fail("the model was read"))
    status, out, err = cli(capsys, saved_model, PHOTO, "--precision", "int8", *QUICK)
    assert status == 2 and out == "" and len(err) == 1
    assert err[0].startswith("clipqwen-caption: error: --precision int8 needs the optimum-quanto library")
    assert 'pip install "clipqwen[quantize]"' in err[0]


def test_app_captions_in_the_operators_precision(app, saved_model):
    serving = app.Serving(app.served_models(str(saved_model), "", []), precision="bf16")
    gallery, text, status = app.caption([str(PHOTO)], str(saved_model), app.BEAM, 1, 0.7, 0.9, 3, "", serving=serving)
    assert status.startswith("Captioned 1 image") and gallery[0][1].strip()
    assert "(bf16)" in status or "(bf16, decoder weights prepacked for oneDNN)" in status, status
    model, _ = app.get_model(str(saved_model), serving)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "precision, message",
    [
        ("int4", "argument --precision: invalid choice: 'int4'"),
        ("int8", 'needs the optimum-quanto library, which is not installed: pip install "clipqwen[quantize]"'),
    ],
)
def test_app_refuses_a_precision_it_cannot_run_at_startup(precision, message, app, saved_model, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    monkeypatch.setattr(app, "build_demo", lambda *args, **kwargs: pytest.fail("the demo was built"))
    with pytest.raises(SystemExit) as exit_info:
        app.main([str(saved_model), "--precision", precision])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
