"""Self-test of the local Hub stand-in (tests/localhub/): the real clients, in child processes, against the three
repositories the project reads (CLIP, Qwen3, Flickr30K's parquet branch) and against an upload.

The online code runs in child processes: conftest switches this process offline, and huggingface_hub reads
HF_ENDPOINT at import. Each child prints one JSON line of observations; the assertions are here.
"""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest


pytest.importorskip("olah", reason="the local Hub stand-in serves through olah (pip install olah==0.5.4)")

from localhub import CLIP_ID, FLICKR_ID, QWEN_ID, LocalHub, build_clip_repo, build_flickr30k_repo, build_qwen_repo


N_IMAGES = 40  # 32 train / 4 val / 4 test, in shards of 15 rows: 0000..0002.parquet
COLUMNS = ["image", "caption", "sentids", "split", "img_id", "filename"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with LocalHub(tmp_path_factory.mktemp("localhub")) as hub:
        build_clip_repo(hub)
        build_qwen_repo(hub)
        build_flickr30k_repo(hub, N_IMAGES, rows_per_shard=15)
        yield hub


def run_child(hub: LocalHub, tmp_path, code: str, **env) -> dict:
    env = hub.env(hf_home=tmp_path / "hf-home", TRANSFORMERS_VERBOSITY="error", **env)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (
        f"{result.stderr[-6000:]}\n--- front.log:\n" + (hub.logs / "front.log").read_text()[-3000:]
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def request(url: str, method: str = "GET", headers: dict | None = None):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never through a proxy
    try:
        with opener.open(urllib.request.Request(url, method=method, headers=headers or {}), timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_http_contract(hub):
    """What the clients rely on, byte-level: error codes, revisions with slashes, ranges."""
    parquet_sha = hub.sha("dataset", FLICKR_ID, "refs/convert/parquet")
    for revision in ("refs%2Fconvert%2Fparquet", "refs/convert/parquet", parquet_sha, parquet_sha[:10]):
        url = f"{hub.endpoint}/datasets/{FLICKR_ID}/resolve/{revision}/TEST/test/0000.parquet"
        status, headers, body = request(url)
        assert (status, headers["X-Repo-Commit"], body[:4]) == (200, parquet_sha, b"PAR1"), revision
    for method in ("HEAD", "GET"):
        status, headers, _ = request(f"{hub.endpoint}/{CLIP_ID}/resolve/main/model.safetensors", method)
        assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
    status, headers, _ = request(f"{hub.endpoint}/api/datasets/{FLICKR_ID}/tree/main/data")
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
    status, headers, _ = request(f"{hub.endpoint}/api/models/{CLIP_ID}/revision/no-such-branch")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    status, headers, _ = request(f"{hub.endpoint}/api/models/nobody/nothing")
    assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")
    status, headers, body = request(
        f"{hub.endpoint}/{CLIP_ID}/resolve/refs/pr/66/model.safetensors", headers={"Range": "bytes=8-9"}
    )
    assert (status, headers["Content-Range"].split("/")[0], body) == (206, "bytes 8-9", b'{"')
    status, _, body = request(f"{hub.endpoint}/api/models/{CLIP_ID}")
    assert (status, json.loads(body)["sha"], json.loads(body)["private"]) == (200, hub.sha("model", CLIP_ID), False)


READ_CHILD = f"""
import json, os
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
api, out = HfApi(), {{}}
clip, qwen, flickr = {CLIP_ID!r}, {QWEN_ID!r}, {FLICKR_ID!r}

out["clip_model_type"] = json.load(open(hf_hub_download(clip, "config.json")))["model_type"]
try:
    hf_hub_download(clip, "model.safetensors")
except EntryNotFoundError as err:
    out["missing_file"] = type(err).__name__
out["parquet_sha"] = api.dataset_info(flickr, revision="refs/convert/parquet").sha
out["flickr_main_sha"] = api.dataset_info(flickr).sha
out["converts"] = [ref.ref for ref in api.list_repo_refs(flickr, repo_type="dataset").converts]

import datasets
for revision in (out["parquet_sha"], "refs/convert/parquet"):
    ds = datasets.load_dataset(flickr, revision=revision)
    test = ds["test"]
    row = test[0]
    out[revision] = dict(splits=list(ds), rows=len(test), columns=test.column_names,
                         image_feature=type(test.features["image"]).__name__,
                         image=[row["image"].mode, *row["image"].size], captions=len(row["caption"]),
                         sentids=len(row["sentids"]), split_values=sorted(set(test["split"])))

weights_only = []
torch_load = torch.load
def spy(*args, **kwargs):
    weights_only.append(kwargs.get("weights_only"))
    return torch_load(*args, **kwargs)
torch.load = spy
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionModelWithProjection
os.environ["DISABLE_SAFETENSORS_CONVERSION"] = "1"
from_bin = CLIPVisionModelWithProjection.from_pretrained(clip, use_safetensors=False)
out["bin_weights_only"] = weights_only
from_pr = CLIPVisionModelWithProjection.from_pretrained(clip, revision="refs/pr/66", use_safetensors=True)
same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
out["pr_equals_bin"] = same(from_bin, from_pr)
try:
    CLIPVisionModelWithProjection.from_pretrained(clip, use_safetensors=True)
    out["conversion_disabled"] = "loaded"
except OSError:
    out["conversion_disabled"] = "OSError"
del os.environ["DISABLE_SAFETENSORS_CONVERSION"]  # transformers now finds the converter bot's PR #66
auto = CLIPVisionModelWithProjection.from_pretrained(clip, use_safetensors=True)
out["auto_conversion_equals_bin"] = same(from_bin, auto)
processor = CLIPImageProcessor.from_pretrained(clip)
out["processor"] = [dict(processor.size), dict(processor.crop_size), int(processor.resample), processor.do_convert_rgb]

lm = AutoModelForCausalLM.from_pretrained(qwen)
tokenizer = AutoTokenizer.from_pretrained(qwen)
out["qwen"] = [type(lm).__name__, lm.config.vocab_size, lm.config.tie_word_embeddings, str(lm.dtype),
               lm.generation_config.eos_token_id, tokenizer.eos_token]
out["token_ids"] = tokenizer("A dog runs on the beach.").input_ids
print(json.dumps(out))
"""


def test_read_models_and_data(hub, tmp_path):
    out = run_child(hub, tmp_path, READ_CHILD)
    parquet_sha = hub.sha("dataset", FLICKR_ID, "refs/convert/parquet")
    assert out["clip_model_type"] == "clip"
    assert out["missing_file"] == "RemoteEntryNotFoundError"
    assert (out["parquet_sha"], out["flickr_main_sha"]) == (parquet_sha, hub.sha("dataset", FLICKR_ID))
    assert out["converts"] == ["refs/convert/parquet"]
    for revision in (parquet_sha, "refs/convert/parquet"):
        assert out[revision] == dict(
            splits=["test"],
            rows=N_IMAGES,
            columns=COLUMNS,
            image_feature="Image",
            image=["RGB", 256, 256],
            captions=5,
            sentids=5,
            split_values=["test", "train", "val"],
        ), revision
    assert out["bin_weights_only"] and all(flag is True for flag in out["bin_weights_only"])
    assert out["pr_equals_bin"] and out["auto_conversion_equals_bin"]
    assert out["conversion_disabled"] == "OSError"
    assert out["processor"] == [{"shortest_edge": 224}, {"height": 224, "width": 224}, 3, True]
    assert out["qwen"] == ["Qwen3ForCausalLM", 151936, True, "torch.bfloat16", 151643, "<|im_end|>"]
    assert out["token_ids"] == [32, 5562, 8473, 389, 279, 11321, 13]


UPLOAD_CHILD = """
import json, os, tempfile
from pathlib import Path
from huggingface_hub import HfApi, hf_hub_download
api, repo, out = HfApi(), "you/test-model", {}
folder = Path(tempfile.mkdtemp())
files = {"config.json": b'{"model_type": "test"}\\n', "model.safetensors": os.urandom(3000), "sub/notes.txt": b"hi\\n"}
for name, data in files.items():
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
(folder / "train.log").write_text("ignored")

out["repo_id"] = api.create_repo(repo, private=True).repo_id
api.create_repo(repo, private=True, exist_ok=True)
api.create_branch(repo, branch="dev")
api.create_branch(repo, branch="dev", exist_ok=True)
oid = api.upload_folder(repo_id=repo, folder_path=folder, revision="dev", ignore_patterns=["*.log"],
                        commit_message="Add model").oid
out["oid"] = oid
out["same_bytes"] = all(Path(hf_hub_download(repo, name, revision=oid)).read_bytes() == data
                        for name, data in files.items())
out["files_at_oid"] = sorted(api.list_repo_files(repo, revision=oid))
out["files_at_main"] = sorted(api.list_repo_files(repo))
info = api.model_info(repo, revision="dev")
out["dev"] = [info.sha, info.private]
out["branches"] = sorted((b.name, b.target_commit) for b in api.list_repo_refs(repo).branches)
readme = api.upload_file(path_or_fileobj=b"# card\\n", path_in_repo="README.md", repo_id=repo, revision="dev",
                         commit_message="Add card")
out["readme_oid"] = readme.oid
out["dev_history"] = [c.commit_id for c in api.list_repo_commits(repo, revision="dev")][:2] == [readme.oid, oid]
print(json.dumps(out))
"""


def test_upload_and_read_back(hub, tmp_path):
    out = run_child(hub, tmp_path, UPLOAD_CHILD)
    oid = out["oid"]
    assert out["repo_id"] == "you/test-model"
    assert hub.sha("model", "you/test-model", "dev") == out["readme_oid"]  # the branch moved on after the check
    assert out["same_bytes"]
    # A new Hub repo starts with a .gitattributes commit on main; the branch is made from it.
    assert out["files_at_oid"] == [".gitattributes", "config.json", "model.safetensors", "sub/notes.txt"]
    assert out["files_at_main"] == [".gitattributes"]
    assert out["dev"] == [oid, True]
    assert out["branches"] == [["dev", oid], ["main", hub.sha("model", "you/test-model")]]
    assert out["dev_history"]
    git_log = subprocess.run(
        ["git", f"--git-dir={hub.repo_path('model', 'you/test-model')}", "log", "--format=%s", "dev"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert git_log[:3] == ["Add card", "Add model", "initial commit"]
