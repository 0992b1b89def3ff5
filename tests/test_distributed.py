"""Two processes on this CPU (gloo), launched by torchrun (what `accelerate launch --multi_gpu` runs on GPUs), on
one "machine" or as two machines on 127.0.0.1: `accelerate launch --cpu --num_processes 2` starts a single process
unless given an MPI host file."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port


ENV = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# every run here: the tiny model on 16 embedded images, batches of 4 per process, nothing saved but the model
TINY_RUN = (
    "run_captioning.py --use_cpu True --tiny_model --dataset_name embedded --max_train_samples 16 --do_train "
    "--per_device_train_batch_size 4 --per_device_eval_batch_size 2 --report_to none --save_strategy no "
    "--dataloader_pin_memory False"
).split()


def two_processes() -> list[str]:
    """torchrun with two processes on this machine (`accelerate launch --cpu` would start one)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]


@pytest.mark.slow
def test_two_process_ddp_trains_evaluates_and_writes_once(tmp_path):
    out = tmp_path / "ddp"
    command = [
        *two_processes(),
        *TINY_RUN,
        *"--freeze_language_model False --max_eval_samples 7 --do_eval --max_steps 3 --max_new_tokens 4".split(),
        *["--output_dir", str(out), "--feature_cache_dir", str(tmp_path / "features")],
    ]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "process rank 1" in result.stdout + result.stderr  # two processes really ran
    metrics = json.loads((out / "all_results.json").read_text())
    # 7 images over 2 processes: the padded duplicate is dropped, each image scored once
    predictions = [json.loads(line) for line in (out / "predictions_validation.jsonl").read_text().splitlines()]
    assert len(predictions) == 7 and len({p["image_id"] for p in predictions}) == 7
    assert metrics["eval_num_images"] == 7 and "eval_rougeL" in metrics and "train_loss" in metrics
    assert "eval_image_reliance" in metrics and "eval_distinct_captions" in metrics  # gathered over both ranks
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()


@pytest.mark.parametrize(
    "name, distributed, machines",
    [
        ("one_gpu_bf16.yaml", "NO", 1),
        ("multi_gpu_bf16.yaml", "MULTI_GPU", 1),
        ("multi_node_bf16.yaml", "MULTI_GPU", 2),
    ],
)
def test_the_shipped_accelerate_configs_load_and_the_readme_shows_them(name, distributed, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / name))
    assert config.mixed_precision == "bf16" and config.distributed_type == distributed and not config.use_cpu
    assert config.num_machines == machines
    assert f"accelerate launch --config_file configs/accelerate/{name}" in (ROOT / "README.md").read_text()


# ---- several machines, as two "nodes" on 127.0.0.1 ------------------------------------------------------------------
TRAIN = [
    *TINY_RUN,
    *"--freeze_language_model False --max_steps 3 --log_level info --log_level_replica info --seed 7".split(),
]


def trained_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The 2-process single-machine run the two-node runs must match."""
    root = tmp_path_factory.mktemp("one-node")
    command = [
        *two_processes(),
        *TRAIN,
        "--output_dir",
        str(root / "out"),
        "--feature_cache_dir",
        str(root / "features"),
    ]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return trained_weights(root / "out")


@pytest.mark.slow
@pytest.mark.parametrize("shared_cache", [True, False], ids=["shared-cache", "node-local-cache"])
def test_two_nodes_train_the_same_weights_as_two_processes_on_one_machine(one_node, shared_cache, tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 1 twice on 127.0.0.1 (c10d rendezvous, gloo): two machines as far as
    torch.distributed knows, each with its own output folder and, unless shared, its own feature cache."""
    import torch

    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node in range(2):
        folder = tmp_path / f"node{node}"
        cache = tmp_path / "shared-features" if shared_cache else folder / "features"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            endpoint,
            "--rdzv_id",
            "clipqwen-two-nodes",
            *TRAIN,
            "--output_dir",
            str(folder / "out"),
            "--feature_cache_dir",
            str(cache),
        ]
        folder.mkdir()
        log = open(folder / "log.txt", "w")
        nodes.append((folder, subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)))
    for folder, process in nodes:
        assert process.wait(timeout=900) == 0, (folder / "log.txt").read_text()[-4000:]
    logs = {folder: (folder / "log.txt").read_text() for folder, _ in nodes}

    # global rank 0 (whichever node the rendezvous made it) writes the model; the other node writes no model files
    writers = [folder for folder, _ in nodes if (folder / "out" / "model.safetensors").exists()]
    assert len(writers) == 1, logs
    other = next(folder for folder, _ in nodes if folder not in writers)
    written = {path.name for path in (other / "out").iterdir()} if (other / "out").exists() else set()
    assert not written & {"model.safetensors", "config.json", "all_results.json", "README.md"}, written
    two_nodes = trained_weights(writers[0] / "out")
    assert two_nodes.keys() == one_node.keys()
    assert all(torch.equal(two_nodes[name], one_node[name]) for name in one_node)  # bit for bit on the CPU

    for folder, log in logs.items():
        cache = tmp_path / "shared-features" if shared_cache else folder / "features"
        assert len(list(cache.glob("*-shard-*-of-2.arrow"))) == 2
        # shared: each rank encodes its own shard once; node-local: each node also encodes the one its disk lacks
        assert ("encoding it here too" in log) is not shared_cache, log[-4000:]


@pytest.mark.slow
def test_two_ranks_each_encode_a_shard_of_the_feature_cache_and_both_train_on_all_of_it(tmp_path):
    """Issue 11: no rank waits while another builds the whole cache; the merged cache is the full split."""
    out = tmp_path / "ddp"
    command = [
        *two_processes(),
        *TINY_RUN,
        *"--max_steps 2 --log_level info --log_level_replica info --preprocessing_num_workers 1".split(),
        *["--output_dir", str(out), "--feature_cache_dir", str(tmp_path / "features")],
    ]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    # batches of 8 (eval batch 2 × 4): rank 0 encodes rows 0-7, rank 1 rows 8-15, each into its own file
    assert "train: rank 0 of 2 encodes rows 0 to 7 (8 images)" in log, log[-6000:]
    assert "train: rank 1 of 2 encodes rows 8 to 15 (8 images)" in log, log[-6000:]
    for rank in (0, 1):
        assert f"train: rank {rank} of 2 reads the feature cache: 16 images from 2 file(s)" in log, log[-6000:]
    shards = sorted(path.name for path in (tmp_path / "features").glob("*.arrow"))
    assert len(shards) == 2 and shards[0].endswith("-shard-0-of-2.arrow") and shards[1].endswith("-shard-1-of-2.arrow")
    assert "process rank 1" in log and log.count("reads the feature cache") == 2  # two processes, both with all rows
    assert json.loads((out / "all_results.json").read_text())["train_loss"] is not None
