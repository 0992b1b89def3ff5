"""The online path, for real: the README's Flickr30K commands run against a local Hub stand-in (tests/localhub/:
olah serving git repositories with the real layouts, plus the calls olah lacks, uploads included) from an
environment holding only what `pip install -e .` installs: backbones and data by Hub id → train → evaluate →
predict → export → push → a fresh process loads the pushed commit by id and sha and captions a photo.

Each child process gets HF_ENDPOINT, online mode and its own HF_HOME (conftest keeps this process offline)."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import PHOTOS, ROOT
from localhub import CLIP_ID, FLICKR_ID, LocalHub, build_clip_repo, build_flickr30k_repo, build_qwen_repo


pytestmark = [pytest.mark.runtime, pytest.mark.slow]

# The README's "try the whole path in minutes first" flags, the only ones added to its commands.
QUICK = ["--max_steps", "8", "--max_train_samples", "256", "--max_eval_samples", "32", "--max_predict_samples", "32"]
PICKLES = re.compile(r"\.(bin|pt|pth|pkl|pickle|ckpt)$|\.tmp$")

LOAD_BACK = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

repo, revision, folder, photo = sys.argv[1:]
model = AutoModel.from_pretrained(repo, trust_remote_code=True, revision=revision)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True, revision=revision)
local = AutoModel.from_pretrained(folder, trust_remote_code=True)
inputs = processor(images=[Image.open(photo)])
captions = [processor.batch_decode(m.generate(**inputs)[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
            for m in (model, local)]
same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
print(json.dumps({"module": type(model).__module__, "caption": captions[0], "local_caption": captions[1],
                  "same_weights": same, "num_beams": model.generation_config.num_beams}))
"""


def readme_commands() -> list[list[str]]:
    """The `accelerate launch run_captioning.py …` commands of the README's Flickr30K section, as printed."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Train on Flickr30K") :]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    lines = [
        line
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith("accelerate launch run_captioning.py")
    ]
    return [shlex.split(line) for line in lines]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("localhub")
    with LocalHub(root) as local_hub:
        build_clip_repo(local_hub)
        build_qwen_repo(local_hub)
        build_flickr30k_repo(local_hub, n_images=300)
        yield local_hub


def run_child(hub, python, args, cwd, hf_home, timeout=900):
    result = subprocess.run(
        [python, *args],
        cwd=cwd,
        env=hub.env(hf_home=hf_home, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{args[:3]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def pushed_files(hub, repo_id, sha) -> list[str]:
    gitdir = hub.repo_path("model", repo_id)
    return subprocess.run(
        ["git", "--git-dir", str(gitdir), "ls-tree", "-r", "--name-only", sha],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()


def test_readme_has_both_flickr30k_presets():
    assert f"add `{' '.join(QUICK)}`" in " ".join((ROOT / "README.md").read_text().split())
    commands = readme_commands()
    assert len(commands) == 2 and all("--push_to_hub" in c for c in commands)
    assert "linear" not in commands[1] and "mlp2x_gelu" in commands[1] and "--lora_r" in commands[1]
    assert "--preset" not in commands[0]  # the default layout; the course's is named beside it
    assert "--preset seed_exact" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("preset", [0, 1], ids=["clipcap", "patch-lora"])
def test_readme_flickr30k_command_trains_pushes_and_loads_back_by_id_and_sha(preset, hub, runtime_python, tmp_path):
    command = readme_commands()[preset]
    accelerate = str(Path(runtime_python).with_name("accelerate"))
    (tmp_path / "run_captioning.py").symlink_to(ROOT / "run_captioning.py")  # outputs/ lands in tmp_path
    result = subprocess.run(
        [accelerate, *command[1:], *QUICK],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=hub.env(hf_home=tmp_path / "hf-home", PYTHONUNBUFFERED="1"),
        timeout=1200,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-8000:]
    out = tmp_path / command[command.index("--output_dir") + 1]
    repo_id = command[command.index("--hub_model_id") + 1]

    # the data came from refs/convert/parquet, pinned to its commit
    data_sha = hub.sha("dataset", FLICKR_ID, "refs/convert/parquet")
    assert f"is commit {data_sha}" in log
    card = (out / "README.md").read_text()
    assert data_sha in card and "base_model:\n- openai/clip-vit-base-patch32\n- Qwen/Qwen3-0.6B-Base" in card
    assert "| optimizer steps | 8 |" in card and "| precision | fp32 |" in card
    # the default layout (ClipCap, or the patch tokens the second command asks for), prompted as it trained
    config = json.loads((out / "config.json").read_text())
    assert (config["projector_type"], config["vision_feature_type"]) == ("mlp2x_gelu", ["pooled", "patch"][preset])
    assert config["num_pooled_image_tokens"] == 8
    assert json.loads((out / "processor_config.json").read_text())["prompt"] == "Image:<|image_pad|>"
    assert "has no safetensors weights at this revision" in log  # CLIP's main branch: .bin through weights_only
    assert "not the Karpathy split's" in log  # the stand-in has 300 images, not 31,014
    assert "discussions" not in (hub.logs / "front.log").read_text()  # the converter bot was never asked

    # what was pushed: the pinned commit in the card, its files, no pickles, no temporary files
    sha = re.search(r'^revision = "([0-9a-f]{40})"', card, re.MULTILINE).group(1)
    files = pushed_files(hub, repo_id, sha)
    print(f"\n{repo_id}@{sha} holds:\n  " + "\n  ".join(files))
    assert not [name for name in files if PICKLES.search(name)], files
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "modeling_clipqwen.py",
        "processor_config.json",
        "README.md",
        "predictions_test.jsonl",
        "last-checkpoint/trainable_weights.safetensors",
    } <= set(files)
    assert not any(name.startswith("checkpoint-") or name.startswith("lora/README") for name in files)
    # an fp32 run computes in fp32, whatever the Hub checkpoints' dtypes (the stand-in Qwen3 is bf16, as the real one)
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}
    head = hub.sha("model", repo_id, "main")
    card_on_hub = subprocess.run(
        ["git", "--git-dir", str(hub.repo_path("model", repo_id)), "show", f"{head}:README.md"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f'revision = "{sha}"' in card_on_hub

    # a fresh process elsewhere loads the pushed commit by id and sha, with the repository's own code
    photo = sorted(PHOTOS.glob("*.jpg"))[0]
    child = run_child(
        hub, runtime_python, ["-c", LOAD_BACK, repo_id, sha, str(out), str(photo)], tmp_path, tmp_path / "hf-home-2"
    ).stdout
    loaded = json.loads(child.strip().splitlines()[-1])
    print(f"caption by {repo_id}@{sha[:10]}: {loaded['caption']!r}")
    assert loaded["module"].startswith("transformers_modules") and loaded["same_weights"]
    assert loaded["caption"] == loaded["local_caption"] and loaded["num_beams"] == 3 - 2 * preset


def test_push_to_a_private_branch_pins_that_branchs_commit(hub, runtime_python, tmp_path, make_model, processor):
    """--hub_revision (created from main when missing) and --hub_private_repo, through the same push path."""
    folder = tmp_path / "export"
    make_model().save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "README.md").write_text('revision = "<commit sha>"\n')
    (folder / "training_args.bin").write_bytes(b"a pickle that must stay home")
    run_child(
        hub,
        runtime_python,
        ["-m", "clipqwen.hub", str(folder), "you/clipqwen-dev", "--revision", "dev", "--private"],
        ROOT,
        tmp_path / "hf-home",
    )
    sha = re.search(r'revision = "([0-9a-f]{40})"', (folder / "README.md").read_text()).group(1)
    assert "training_args.bin" not in pushed_files(hub, "you/clipqwen-dev", sha)
    info = run_child(
        hub,
        runtime_python,
        [
            "-c",
            "from huggingface_hub import model_info; i = model_info("
            "'you/clipqwen-dev', revision='dev'); print(i.private, i.sha)",
        ],
        ROOT,
        tmp_path / "hf-home",
    ).stdout.split()
    # the card commit follows
    assert info[0] == "True" and info[1] == hub.sha("model", "you/clipqwen-dev", "dev") != sha


def test_readme_backbone_block_assembles_from_the_hub(hub, runtime_python, tmp_path):
    """The README block marked `needs: hub`, as written, against the stand-in's CLIP (.bin only) and Qwen3."""
    from test_readme import readme_blocks

    code = "\n".join(code for needs_hub, code in readme_blocks() if needs_hub)
    code += "\nprint(type(model.model.vision_tower).__name__, model.config.projector_type,"
    code += " model.config.vision_feature_type)"
    result = run_child(hub, runtime_python, ["-c", code], tmp_path, tmp_path / "hf-home")
    assert result.stdout.split()[-3:] == ["CLIPVisionModelWithProjection", "mlp2x_gelu", "patch"]
    assert "no safetensors weights" in result.stdout + result.stderr and CLIP_ID in result.stdout + result.stderr
