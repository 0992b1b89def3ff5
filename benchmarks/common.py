"""Shared pieces of the benchmarks: the full-size model with random weights, real photos and captions,
device and weight-precision choice, peak-memory measurement, analytic FLOPs, running each variant in its own
process in alternating rounds, and benchmarks/results.json.

Every variant (the course pipeline and ours) runs in a fresh subprocess that builds the same model from the
same seed, so that peak memory is measured the same way for each and one variant's allocations cannot
inflate another's: on CUDA `torch.cuda.max_memory_allocated`, on CPU the process's peak resident set size
(VmHWM), reset after the model is built so that both report "weights + what the pipeline needs".
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing comes from the Hub: weights are random
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the Hub files live at the repository root

import torch  # noqa: E402

from clipqwen.precision import (  # noqa: E402
    apply_precision,
    choose_precision,
    cpu_flags,
    cpu_has_native_bf16,
    default_precision,
)
from clipqwen.presets import LAYOUTS, layout_config  # noqa: E402
from clipqwen.tiny import bundled_processor, tiny_config  # noqa: E402
from clipqwen.training.freezing import freeze_backbones, set_training_dtypes  # noqa: E402
from configuration_clipqwen import ClipQwenConfig  # noqa: E402
from modeling_clipqwen import ClipQwenForConditionalGeneration  # noqa: E402


PHOTOS = ROOT / "examples" / "coco-cc-by"
RESULTS = ROOT / "benchmarks" / "results.json"
CACHE_RESULTS = ROOT / "benchmarks" / "cache_results.json"
# CPU flags worth recording: bf16 and int8 arithmetic in hardware differ between these machines.
RECORDED_FLAGS = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "bf16",
    "i8mm",
)
# Dense bf16 tensor-core peak (no sparsity) of the chips the GPU script may run on, in FLOP/s.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ---- device, dtype, model --------------------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# The weights a variant runs with. "course" is the course project's own choice: CLIP (and the projector) in fp32,
# Qwen3 loaded in bf16. "default" is what clipqwen captions in by default on this machine (clipqwen.precision: bf16
# on CUDA and on CPUs with native bf16, fp32 elsewhere); "training" what run_captioning.py trains in by default.
WEIGHTS = ("course", "fp32", "bf16", "int8", "default", "training")


def resolve_weights(device: torch.device, weights: str) -> str:
    if weights == "training":
        return training_precision(device)
    return default_precision(device) if weights == "default" else weights


def training_precision(device: torch.device) -> str:
    """run_captioning.py's own choice (clipqwen.precision.choose_precision), asked rather than restated so the two
    cannot drift: bf16 on CUDA GPUs with bf16, fp32 on every CPU (bf16 training scored lower on Flickr8k val,
    docs/flickr8k.md)."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=tempfile.gettempdir(), report_to="none", use_cpu=device.type != "cuda")
    return "bf16" if choose_precision(SimpleNamespace(auto_bf16=True), args).bf16 else "fp32"


def configure_threads(threads: int | None):
    """CPU threads for torch (None: torch's default, one per core). On a machine shared with other busy
    processes, 2-thread OpenMP regions stall for a scheduler slice whenever the second thread is not running:
    measured here, silu on 16×3072 took 6 ms with 2 threads and 22 µs with 1 under load ≈ 4 on 2 cores."""
    if threads:
        torch.set_num_threads(threads)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def profiled(enabled: bool, rows: int = 15):
    """torch.profiler around the timed region when enabled; prints the top ops by self time to stderr."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def run():
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            yield
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        log(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48))

    return run()


def stream_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Read bandwidth (GB/s) of a sum over an fp32 tensor far larger than the caches (decoding at batch 1 reads
    every weight once per token), per wall-clock second and per CPU second of this process: on a shared
    machine the two differ by the share of the core the scheduler gave us."""
    x = torch.ones(int(gib * 2**30) // 4)
    wall, cpu = zip(*(clocked(x.sum)[0] for _ in range(repeats)))
    return {
        "read_gb_s_wall": round(x.nbytes / min(wall) / 1e9, 2),
        "read_gb_s_cpu": round(x.nbytes / min(cpu) / 1e9, 2),
    }


def clocked(fn):
    """((wall seconds, CPU seconds of this process), fn())."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's weights as stored: quanto's int8 weights count their int8 data and scales."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if hasattr(tensor, "_data") and hasattr(tensor, "_scale"):  # optimum-quanto QTensor
            total += tensor._data.nbytes + tensor._scale.nbytes
        else:
            total += tensor.nbytes
    return total


def caption_bytes(model, new_tokens: int) -> tuple[int, int]:
    """(bytes of decoder weights read per new token, bytes read for one batch-1 caption): the image tower's and
    projector's weights once, the decoder's (LM head included) once per new token, prefill writing the first.
    Divided by the read bandwidth, the second is the caption's floor."""
    decoder = weight_bytes(model.get_decoder().layers) + weight_bytes(model.lm_head)
    tower = weight_bytes(model.model.vision_tower) + weight_bytes(model.model.multi_modal_projector)
    return decoder, tower + new_tokens * decoder


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)".replace("  ", " ")


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for chip, flops in PEAK_BF16_FLOPS.items() if chip in name), None)


def build_model(device: torch.device, weights: str, preset: str, seed: int = 0, tiny: bool = False, **config_kwargs):
    """The full-size architecture (`ClipQwenConfig()` defaults are CLIP ViT-B/32 + Qwen3-0.6B-Base) in the layout of
    run_captioning.py's `preset` (`config_kwargs` override it) with random weights, built directly on `device`, in
    `weights` (WEIGHTS). Same seed ⇒ same weights in every process. `tiny` builds the test preset instead (a smoke
    test of the scripts, not a benchmark)."""
    random.seed(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    settings = {**layout_config(preset), **config_kwargs}
    config = tiny_config(**settings) if tiny else ClipQwenConfig(**settings)
    with torch.device(device):
        model = freeze_backbones(ClipQwenForConditionalGeneration(config))  # the projector alone trains
    weights = resolve_weights(device, weights)
    if weights == "course":
        model.get_decoder().to(torch.bfloat16)  # Qwen3ForCausalLM in bf16; CLIP and the projector stay fp32, as the
        model.lm_head.to(torch.bfloat16)  # course loads them
    elif weights == "int8":
        apply_precision(model, "int8")  # inference only: bf16 CLIP and projector, int8 decoder linears
    else:  # as run_captioning.py: the trainable projector in fp32 (AdamW's master weights), the frozen towers in bf16
        set_training_dtypes(model, torch.float32 if weights == "fp32" else torch.bfloat16)
    log(
        f"built {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters "
        f"on {device} in {time.perf_counter() - start:.1f} s, weights {weights}"
    )
    return model


def course_logits(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """What the course's Qwen3ForCausalLM call computes: the decoder, then the LM head at every position."""
    hidden = model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
    return model.lm_head(hidden.last_hidden_state)


def processor_for(model, preset: str):
    return bundled_processor(num_image_tokens=model.config.num_image_tokens, prompt=LAYOUTS[preset]["prompt"])


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- data --------------------------------------------------------------------------------------------------
def load_examples():
    """[(jpeg path, [5 human captions])] for the 8 CC-BY COCO photos, in file-name order."""
    rows = [json.loads(line) for line in open(PHOTOS / "metadata.jsonl")]
    return sorted((PHOTOS / row["file_name"], row["captions"]) for row in rows)


def pair_stream(n: int, seed: int = 0):
    """n (image index, path, caption) pairs: every image × caption pair once per epoch (40), shuffled per
    epoch with a fixed seed, as a Trainer would see them. Both pipelines read the same stream."""
    examples = load_examples()
    epoch = [(i, path, caption) for i, (path, captions) in enumerate(examples) for caption in captions]
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        order = epoch[:]
        rng.shuffle(order)
        pairs.extend(order)
    return pairs[:n]


def image_paths(n: int):
    """n photo paths, cycling the 8 photos."""
    examples = load_examples()
    return [examples[i % len(examples)][0] for i in range(n)]


# ---- memory ------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of what runs inside the `with` block, weights included. CUDA: max_memory_allocated.
    CPU: the process's peak RSS (VmHWM), reset at entry via /proc/self/clear_refs (Linux)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = None
        self.peak_bytes = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets the peak-RSS watermark
                self.method = "peak RSS (VmHWM) after a reset at model-built"
            except OSError:
                self.method = "peak RSS (ru_maxrss) of the whole process, model build included"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("peak RSS (VmHWM)"):
            self.peak_bytes = _proc_status_kb("VmHWM") * 1024
        else:
            import resource

            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False

    def report(self):
        return {"peak_memory_gib": round(self.peak_bytes / 2**30, 3), "peak_memory_method": self.method}


def _proc_status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# ---- analytic FLOPs ----------------------------------------------------------------------------------------
def clip_forward_flops(vision_config) -> float:
    """One image through the CLIP vision tower (all layers run, also for patch features) + projection."""
    d, i, layers = vision_config.hidden_size, vision_config.intermediate_size, vision_config.num_hidden_layers
    grid = vision_config.image_size // vision_config.patch_size
    tokens = grid * grid + 1
    patch_embed = 2 * (3 * vision_config.patch_size**2) * d * grid * grid
    per_layer = tokens * 2 * (4 * d * d + 2 * d * i) + 4 * d * tokens * tokens  # linears + QKᵀ, AV
    return patch_embed + layers * per_layer + 2 * d * vision_config.projection_dim


def lm_forward_flops(text_config, seq_len: int, logit_positions: int) -> float:
    """Qwen3 forward over one sequence of `seq_len` positions (padding included: it is computed), with the
    LM head applied at `logit_positions` of them. Attention scores counted causally (½ T²)."""
    d, inter, v = text_config.hidden_size, text_config.intermediate_size, text_config.vocab_size
    hq = text_config.num_attention_heads * text_config.head_dim
    hkv = text_config.num_key_value_heads * text_config.head_dim
    linear_params = d * hq + 2 * d * hkv + hq * d + 3 * d * inter
    attention = 4 * hq * seq_len * (seq_len + 1) / 2
    linears = 2 * linear_params * seq_len
    head = 2 * d * v * logit_positions
    return text_config.num_hidden_layers * (linears + attention) + head


def frozen_lm_train_flops(text_config, seq_len: int, logit_positions: int) -> float:
    """Forward + backward of a frozen LM whose gradient must reach its input embeddings (the projector):
    backward computes activation gradients only (no weight gradients), which costs what the forward's
    matrix products cost (grad_x = grad_y·Wᵀ), and twice the forward for attention (dQ, dK, dV, dP).
    So ≈ 2 × forward for linears and LM head, 3 × forward for the attention scores."""
    fwd = lm_forward_flops(text_config, seq_len, logit_positions)
    attn_fwd = (
        text_config.num_hidden_layers
        * 4
        * text_config.num_attention_heads
        * text_config.head_dim
        * seq_len
        * (seq_len + 1)
        / 2
    )
    return 2 * fwd + attn_fwd


def projector_train_flops(projector: torch.nn.Module, vectors: int) -> float:
    """Adapter forward + full backward (weight grads too): 6 FLOPs per parameter per input vector."""
    return 6 * sum(p.numel() for p in projector.parameters()) * vectors


# ---- variants in subprocesses --------------------------------------------------------------------------------
def run_variant_subprocess(script: Path, variant: str, argv: list[str]) -> dict:
    """Run `script --only VARIANT argv…` in a fresh Python and return the JSON object on its last stdout line."""
    command = [sys.executable, str(script), "--only", variant, *argv]
    log(f"\n=== {variant}: {' '.join(command[1:])}")
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rounds(script: Path, variants: list[str], argv: list[str], rounds: int) -> dict[str, list[dict]]:
    """Every variant once per round, each in its own process, in alternating order (forward, then backward), so
    that a change in the machine's load during the run falls on both sides of each comparison alike."""
    results = {variant: [] for variant in variants}
    for round_ in range(rounds):
        order = variants if round_ % 2 == 0 else variants[::-1]
        log(f"\n##### round {round_ + 1} of {rounds}: {', '.join(order)}")
        for variant in order:
            result = run_variant_subprocess(script, variant, argv)
            result["round"] = round_ + 1
            results[variant].append(result)
    return results


def measure_variants(script: Path, benchmark: str, args, argv, device: torch.device, median_keys: tuple[str, ...]):
    """The parent's side of a benchmark: every variant of `args.variants` for `args.rounds` rounds (`run_rounds`).
    Returns the runs per variant, each variant's `median_summary` and the summary record's head (the machine)."""
    argv = list(argv if argv is not None else sys.argv[1:])
    variants = [v for v in args.variants.split(",") if v]
    runs = run_rounds(script, variants, argv, args.rounds)
    results = {v: median_summary(r, median_keys) for v, r in runs.items()}
    head = {
        "benchmark": benchmark,
        **environment(device),
        "rounds": args.rounds,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }
    return runs, results, head


def emit_variant(result: dict, load_before: float | None):
    """The child's side: its record with the threads it ran on and the machine's load before and after, as JSON."""
    result["threads"] = torch.get_num_threads()
    result["load_average_1min"] = [load_before, load_average()]
    emit(result)


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def per_round_ratios(
    results: dict[str, list[dict]],
    variant: str,
    baseline: str,
    key: str,
    digits: int = 3,
    baseline_key: str | None = None,
):
    """ours[key] / baseline[baseline_key or key] within each round (both measured under that round's load)."""
    return [
        ratio(ours[key], base[baseline_key or key], digits) for ours, base in zip(results[variant], results[baseline])
    ]


def headline_ratios(ratios: dict, name: str, speed_key: str, default: str, bf16: str) -> dict:
    """The top-level figures of results.json: `<name>_ratio` and `<name>_peak_memory_ratio` of our default variant
    against the course (and the same with `_bf16` for our bf16 variant), where they were measured."""
    headline = {}
    for variant, suffix in ((default, ""), (bf16, "_bf16")):
        if f"{variant}/course" in ratios:
            headline[f"{name}_ratio{suffix}"] = ratios[f"{variant}/course"][speed_key]
            headline[f"{name}_peak_memory_ratio{suffix}"] = ratios[f"{variant}/course"]["peak_memory_gib"]
    return headline


def median_summary(runs: list[dict], keys: tuple[str, ...]) -> dict:
    """The first round's full record, with each of `keys` replaced by its median over the rounds and its values
    per round beside it (`<key>_rounds`)."""
    summary = dict(runs[0])
    for key in keys:
        values = [run.get(key) for run in runs]
        summary[key] = median(values)
        summary[key + "_rounds"] = values
    summary["rounds"] = len(runs)
    return summary


def write_results(section: str, figures: dict, headline: dict, environment_record: dict, path: Path = RESULTS):
    """Merge one benchmark's figures into benchmarks/results.json: its headline ratios at the top level, its
    details under `section`, the date, machine and load of this run, and `cache_worker_scaling` copied (with its
    own date) from benchmarks/cache_results.json, which benchmarks/bench_cache.py writes."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        results = {}
    results.update(headline)
    results[section] = {**environment_record, **figures}
    results["date"] = environment_record["date"]
    results["machine"] = environment_record["machine"]
    results.setdefault("dates", {})[section] = environment_record["date"]
    _write_json(_with_cache_figures(results), path)


def update_cache_figures(path: Path = RESULTS):
    """Copy the feature cache's figures into benchmarks/results.json (bench_cache.py, after writing its own file)."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        results = {}
    _write_json(_with_cache_figures(results), path)


def _with_cache_figures(results: dict) -> dict:
    try:
        cache = json.loads(CACHE_RESULTS.read_text(encoding="utf-8"))
        results["cache_worker_scaling"] = cache["cache_worker_scaling"]
        results["cache_new_vs_old_per_core"] = cache.get("cache_new_vs_old_per_core")
        # what a second process got from this machine in the same run: the scaling figure is read against it
        results["machine_scaling_ceiling"] = cache.get("machine_scaling_ceiling")
        results.setdefault("dates", {})["cache_worker_scaling"] = cache.get("date")
        results["cache_worker_scaling_source"] = str(CACHE_RESULTS.relative_to(ROOT))
    except (OSError, ValueError, KeyError):
        log(f"no cache_worker_scaling: {CACHE_RESULTS} is missing or has no such key")
    return results


def _write_json(results: dict, path: Path):
    fd, temporary = tempfile.mkstemp(dir=Path(path).parent, suffix=".json.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(temporary, path)  # readers never see half a file
    log(f"figures written to {path}")


def machine(device: torch.device) -> dict:
    """What the figures depend on: the chip, its cores and (CPU) the flags that decide bf16/int8 speed, and the
    load other processes put on it."""
    flags = cpu_flags()
    return {
        "device": device_name(device),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "cpu_flags": [flag for flag in RECORDED_FLAGS if flag in flags],
        "native_bf16": cpu_has_native_bf16(flags),
        "default_precision": default_precision(device),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def environment(device: torch.device) -> dict:
    import transformers

    return {
        "date": now(),
        "machine": machine(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(["python", _script_name(), *sys.argv[1:]]),
    }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _script_name() -> str:
    script = Path(sys.argv[0]).resolve()
    return str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0]


def ratio(a, b, digits: int = 2):
    return round(a / b, digits) if a is not None and b else None


def emit(result: dict):
    print(json.dumps(result), flush=True)


def add_common_arguments(parser, variants, default_variants=None):
    """The options both benchmarks share: device, threads, rounds, profiling, variants, results file."""
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's, one "
        "per core); use 1 on a machine shared with other busy processes",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="each variant runs once per round, in alternating "
        "order; figures are medians, ratios the median of the per-round ratios",
    )
    parser.add_argument("--profile", action="store_true", help="print the top ops of the timed region (stderr)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny preset: a smoke test of this script, not a benchmark"
    )
    parser.add_argument(
        "--variants",
        default=",".join(default_variants or variants),
        help="comma-separated subset of " + ",".join(variants),
    )
    parser.add_argument(
        "--results",
        default=None,
        help=f"merge the figures into this JSON file (default "
        f"{RESULTS.relative_to(ROOT)}; not written with --tiny unless given)",
    )
    parser.add_argument("--only", choices=variants, help=argparse.SUPPRESS)  # internal: run one variant here


def results_path(args) -> Path | None:
    """--results FILE, or '' for none; by default benchmarks/results.json, except for --tiny smoke tests."""
    if args.results is not None:
        return Path(args.results) if args.results else None
    return None if args.tiny else RESULTS


def autocast(device: torch.device, weights: str):
    """bf16 autocast on CUDA for our bf16 variants (fp32 projector, bf16 frozen weights); elsewhere the weights'
    dtypes decide, as in the course code."""
    if device.type == "cuda" and weights in ("bf16", "int8"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
