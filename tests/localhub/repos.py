"""The three repositories of the project, built with the real layouts: CLIP, Qwen3 and Flickr30K."""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

from .gitstore import HUB_GITATTRIBUTES
from .server import LocalHub


CLIP_ID = "openai/clip-vit-base-patch32"
QWEN_ID = "Qwen/Qwen3-0.6B-Base"
FLICKR_ID = "nlphuji/flickr30k"
SAFETENSORS_PR = 66  # the converter bot's pull request on the real CLIP repo
SAFETENSORS_PR_TITLE = "Adding `safetensors` variant of this model"  # what transformers' auto_conversion looks for

# The real file of openai/clip-vit-base-patch32 (legacy keys: "size"/"crop_size" as ints; transformers reads them as
# shortest_edge 224 / crop 224x224; do_convert_rgb is the class default, True).
CLIP_PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}

FLICKR_README = """---
language:
- en
tags:
- image-captioning
pretty_name: Flickr30k
---

# Flickr30k

Stand-in for tests (tests/localhub/): same layout as the real repository (a loading script on `main`, parquet
files on `refs/convert/parquet`), generated pictures of coloured shapes instead of the Flickr photos.

Original paper: [From image descriptions to visual denotations](https://aclanthology.org/Q14-1006)
"""

FLICKR_SCRIPT = '''"""Flickr30k loading script (stand-in stub: datasets >= 4 no longer runs loading scripts)."""
import datasets

_URL = "https://huggingface.co/datasets/nlphuji/flickr30k/resolve/main/"


class Flickr30k(datasets.GeneratorBasedBuilder):
    BUILDER_CONFIGS = [datasets.BuilderConfig(name="TEST", version=datasets.Version("1.1.0"))]

    def _info(self):
        return datasets.DatasetInfo(features=datasets.Features({
            "image": datasets.Image(), "caption": [datasets.Value("string")], "sentids": [datasets.Value("string")],
            "split": datasets.Value("string"), "img_id": datasets.Value("string"),
            "filename": datasets.Value("string"),
        }))

    def _split_generators(self, dl_manager):
        files = dl_manager.download({"csv": _URL + "flickr_annotations_30k.csv", "zip": _URL + "flickr30k-images.zip"})
        return [datasets.SplitGenerator(name=datasets.Split.TEST, gen_kwargs=files)]

    def _generate_examples(self, csv, zip):
        raise NotImplementedError("stand-in stub")
'''


def _project_on_path() -> None:
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)


def build_clip_repo(hub: LocalHub, repo_id: str = CLIP_ID, seed: int = 0) -> dict[str, str]:
    """A tiny random CLIPModel laid out like the real repo: main has config.json, pytorch_model.bin (no
    safetensors), preprocessor_config.json; ``refs/pr/66`` (the converter bot's open PR, listed by the discussions
    API) adds model.safetensors with the same weights. Returns {"main": sha, "refs/pr/66": sha}."""
    import safetensors.torch
    import torch
    from transformers import CLIPConfig, CLIPModel

    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    config = CLIPConfig(
        text_config=dict(tiny, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(tiny, image_size=224, patch_size=32),
        projection_dim=32,
    )
    config.architectures = ["CLIPModel"]
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        config_json = Path(tmp, "config.json").read_bytes()
    weights = io.BytesIO()
    torch.save(state_dict, weights)
    hub.create_repo("model", repo_id, exist_ok=True)
    main = hub.commit(
        "model",
        repo_id,
        {
            "README.md": "---\ntags:\n- vision\nwidget: []\n---\n\n# CLIP (tiny random stand-in for tests)\n",
            "config.json": config_json,
            "preprocessor_config.json": json.dumps(CLIP_PREPROCESSOR_CONFIG, indent=2) + "\n",
            "pytorch_model.bin": weights.getvalue(),
        },
        message="Upload tiny random CLIPModel",
    )
    pr_ref = f"refs/pr/{SAFETENSORS_PR}"
    pr = hub.commit(
        "model",
        repo_id,
        {
            "model.safetensors": safetensors.torch.save(state_dict, metadata={"format": "pt"}),
        },
        ref=pr_ref,
        parent=main,
        message=SAFETENSORS_PR_TITLE,
        author="SFconvertbot",
    )
    hub.add_pull_request("model", repo_id, SAFETENSORS_PR, SAFETENSORS_PR_TITLE, author="SFconvertbot")
    return {"main": main, pr_ref: pr}


def qwen_tokenizer_files() -> dict[str, bytes]:
    """The real Qwen3 tokenizer files: the project's bundled tokenizer.json + tokenizer_config.json as shipped,
    and vocab.json / merges.txt derived from tokenizer.json (the slow-tokenizer files the real repo also has)."""
    _project_on_path()
    from clipqwen.tiny import bundled_tokenizer_dir

    folder = bundled_tokenizer_dir()
    tokenizer_json = (folder / "tokenizer.json").read_bytes()
    bpe = json.loads(tokenizer_json)["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": (folder / "tokenizer_config.json").read_bytes(),
        "vocab.json": json.dumps(bpe["vocab"], ensure_ascii=False, separators=(",", ":")).encode(),
        "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode(),
    }


def build_qwen_repo(hub: LocalHub, repo_id: str = QWEN_ID, seed: int = 0) -> str:
    """A tiny random Qwen3ForCausalLM (width 64, 2 layers, 4 heads / 2 KV heads, head_dim 16, the real vocabulary of
    151,936 rows, tied embeddings, bos = eos = 151643) in bfloat16 as model.safetensors, with config.json,
    generation_config.json and the real tokenizer files. Returns the sha of main."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    _project_on_path()
    from clipqwen.tiny import TINY_TEXT
    from configuration_clipqwen import QWEN3_0_6B_BASE

    # Qwen3-0.6B-Base's config.json at the tiny width, with its context length
    real_at_tiny_width = {**QWEN3_0_6B_BASE, **TINY_TEXT, "max_position_embeddings": 32768}
    config = Qwen3Config(
        **real_at_tiny_width,
        max_window_layers=2,
        use_sliding_window=False,
        sliding_window=None,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    generation_config = {"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = {name: Path(tmp, name).read_bytes() for name in ("config.json", "model.safetensors")}
    files["generation_config.json"] = json.dumps(generation_config, indent=2) + "\n"
    files.update(qwen_tokenizer_files())
    files["README.md"] = (
        "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n\n"
        "# Qwen3-0.6B-Base (tiny random stand-in for tests)\n"
    )
    hub.create_repo("model", repo_id, exist_ok=True)
    return hub.commit("model", repo_id, files, message="Upload tiny random Qwen3ForCausalLM")


def flickr30k_rows(n_images: int = 300, *, image_size: int = 256, seed: int = 0) -> dict[str, list]:
    """Columns of the stand-in Flickr30K in the real schema, from `clipqwen.data.embedded` (learnable shapes):
    80 % train, 10 % val, 10 % test, interleaved; ``image`` holds JPEG bytes."""
    _project_on_path()
    import numpy as np

    from clipqwen.data.embedded import generate_split

    n_val = n_test = max(1, round(n_images * 0.1))
    n_train = n_images - n_val - n_test
    examples = []
    for split, embedded_split, n in (
        ("train", "train", n_train),
        ("val", "validation", n_val),
        ("test", "test", n_test),
    ):
        examples += [(split, e) for e in generate_split(embedded_split, n, seed=seed, image_size=image_size)]
    order = np.random.default_rng(seed).permutation(len(examples)).tolist()
    columns: dict[str, list] = {k: [] for k in ("image", "caption", "sentids", "split", "img_id", "filename")}
    for row, index in enumerate(order):
        split, example = examples[index]
        jpeg = io.BytesIO()
        example["image"].save(jpeg, format="JPEG", quality=90)
        columns["image"].append({"bytes": jpeg.getvalue(), "path": None})
        columns["caption"].append(list(example["captions"]))
        columns["sentids"].append([str(5 * row + j) for j in range(5)])
        columns["split"].append(split)
        columns["img_id"].append(str(row))
        columns["filename"].append(f"{1000092795 + 7919 * row}.jpg")
    return columns


def build_flickr30k_repo(
    hub: LocalHub,
    n_images: int = 300,
    *,
    rows_per_shard: int = 100,
    image_size: int = 256,
    seed: int = 0,
    repo_id: str = FLICKR_ID,
) -> dict[str, str]:
    """The dataset repo: main holds README.md and the loading script flickr30k.py (which datasets >= 4 refuses, as
    with the real repo); ``refs/convert/parquet`` holds ``TEST/test/0000.parquet``, ``0001.parquet``, ... with
    columns image (Image), caption (list of 5), sentids (list of 5), split, img_id, filename and the datasets
    features in the parquet metadata. Returns {"main": sha, "refs/convert/parquet": sha}."""
    import datasets

    _project_on_path()
    from clipqwen.data.sources import FLICKR30K_FEATURES as features

    columns = flickr30k_rows(n_images, image_size=image_size, seed=seed)
    shards = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shard, start in enumerate(range(0, n_images, rows_per_shard)):
            chunk = {k: v[start : start + rows_per_shard] for k, v in columns.items()}
            path = Path(tmp, f"{shard:04d}.parquet")
            datasets.Dataset.from_dict(chunk, features=features).to_parquet(str(path))
            shards[f"TEST/test/{shard:04d}.parquet"] = path.read_bytes()
    hub.create_repo("dataset", repo_id, exist_ok=True)
    main = hub.commit(
        "dataset",
        repo_id,
        {"README.md": FLICKR_README, "flickr30k.py": FLICKR_SCRIPT},
        message="Add loading script and card",
    )
    parquet = hub.commit(
        "dataset",
        repo_id,
        {".gitattributes": HUB_GITATTRIBUTES, **shards},
        ref="refs/convert/parquet",
        parent=main,
        replace=True,
        message="Update parquet files",
        author="parquet-converter",
    )
    return {"main": main, "refs/convert/parquet": parquet}


def build_all(hub: LocalHub, n_images: int = 300) -> dict[str, dict[str, str]]:
    """The three repositories the project reads from the Hub; returns their shas by repo id and ref."""
    return {
        CLIP_ID: build_clip_repo(hub),
        QWEN_ID: {"main": build_qwen_repo(hub)},
        FLICKR_ID: build_flickr30k_repo(hub, n_images),
    }
