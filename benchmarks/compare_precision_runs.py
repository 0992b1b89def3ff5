"""The same main job in fp32 and in bf16, side by side: training-loss curves and validation/test scores per step,
from the two runs' logs (a run still in progress counts up to where it is), into one figure and one JSON object.

    python run_captioning.py configs/embedded-tiny.json --output_dir outputs/embedded-fp32 > outputs/embedded-fp32.log
    python run_captioning.py configs/embedded-tiny.json --output_dir outputs/embedded-bf16 --bf16 True --use_cpu True \
        > outputs/embedded-bf16.log
    python benchmarks/compare_precision_runs.py outputs/embedded-fp32.log outputs/embedded-bf16.log \
        --figure docs/benchmarks_bf16_vs_fp32.png

The Trainer prints one dict per logging step (`{'loss': ...}`, every --logging_steps) and per evaluation
(`{'eval_loss': ..., 'eval_rougeL': ...}`, at step 0 with --eval_on_start, then every --eval_steps).
"""

import argparse
import ast
import json
import re
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, environment, pick_device, write_results  # noqa: E402


def read_log(path: Path, logging_steps: int, eval_steps: int, eval_on_start: bool) -> dict:
    """{"loss": [(step, loss)], "eval": [(step, {metric: value})], "test": {metric: value}} from a run's log, or
    from its trainer_state.json (exact steps) once the run has finished."""
    folder = path.with_suffix("")  # outputs/x.log → outputs/x/
    state = folder / "trainer_state.json"
    losses, evals, test = [], [], {}
    if (folder / "all_results.json").is_file() and state.is_file():
        for entry in json.loads(state.read_text())["log_history"]:
            if "loss" in entry:
                losses.append((entry["step"], entry["loss"]))
            elif "eval_loss" in entry:
                evals.append((entry["step"], {k.removeprefix("eval_"): v for k, v in entry.items()}))
        results = json.loads((folder / "all_results.json").read_text())
        test = {k.removeprefix("test_"): v for k, v in results.items() if k.startswith("test_")}
        return {"loss": losses, "eval": evals, "test": test}
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    for line in text.splitlines():
        match = re.search(r"(\{'.*\})\s*$", line)  # after tqdm's cursor escapes
        if not match:
            continue
        record = {
            k: float(v)
            for k, v in ast.literal_eval(match.group(1)).items()
            if isinstance(v, (int, float)) or re.fullmatch(r"-?[\d.]+(e-?\d+)?", str(v))
        }
        if "loss" in record:
            losses.append(((len(losses) + 1) * logging_steps, record["loss"]))
        elif "eval_loss" in record:
            step = len(evals) * eval_steps if eval_on_start else (len(evals) + 1) * eval_steps
            evals.append((step, {k.removeprefix("eval_"): v for k, v in record.items()}))
        elif "test_loss" in record:
            test = {k.removeprefix("test_"): v for k, v in record.items()}
    return {"loss": losses, "eval": evals, "test": test}


def compare(runs: dict[str, dict]) -> dict:
    """Loss and validation scores at the steps both runs reached."""
    (name_a, a), (name_b, b) = runs.items()
    loss_b = dict(b["loss"])
    common = [(step, loss, loss_b[step]) for step, loss in a["loss"] if step in loss_b]
    eval_b = dict(b["eval"])
    evals = {
        step: {m: (scores.get(m), eval_b[step].get(m)) for m in ("loss", "rougeL", "bleu4", "cider")}
        for step, scores in a["eval"]
        if step in eval_b
    }
    return {
        "steps_compared": common[-1][0] if common else 0,
        "mean_abs_loss_difference": round(sum(abs(x - y) for _, x, y in common) / max(1, len(common)), 4),
        "last_common_loss": {name_a: common[-1][1], name_b: common[-1][2]} if common else None,
        "validation_at_common_steps": {
            str(step): {m: {name_a: x, name_b: y} for m, (x, y) in scores.items()} for step, scores in evals.items()
        },
        "test": {name: run["test"] for name, run in runs.items()},
    }


def plot(runs: dict[str, dict], figure: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        ax_loss.plot(*zip(*run["loss"]), label=f"{name} training loss", lw=1.2)
        if run["eval"]:
            steps = [s for s, _ in run["eval"]]
            ax_eval.plot(steps, [e.get("rougeL") for _, e in run["eval"]], marker="o", label=f"{name} val ROUGE-L")
            ax_eval.plot(
                steps,
                [e.get("cider", 0) / 10 for _, e in run["eval"]],
                marker="s",
                ls="--",
                label=f"{name} val CIDEr / 10",
            )
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax_eval.set(xlabel="step", ylim=(0, 1.05), title="validation (greedy, 20 new tokens)")
    for ax in (ax_loss, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("configs/embedded-tiny.json: fp32 against bf16 (autocast), same seed and data")
    fig.tight_layout()
    fig.savefig(figure, dpi=110, facecolor="white")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32_log", type=Path)
    parser.add_argument("bf16_log", type=Path)
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--eval_steps", type=int, default=100)
    parser.add_argument("--no_eval_on_start", action="store_true")
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--results", default=str(RESULTS), help="merge into this JSON file ('' = no)")
    args = parser.parse_args(argv)
    runs = {
        name: read_log(path, args.logging_steps, args.eval_steps, not args.no_eval_on_start)
        for name, path in (("fp32", args.fp32_log), ("bf16", args.bf16_log))
    }
    summary = {
        "benchmark": "bf16_vs_fp32_main_job",
        **compare(runs),
        "steps_logged": {name: run["loss"][-1][0] if run["loss"] else 0 for name, run in runs.items()},
    }
    if args.figure:
        plot(runs, args.figure)
        summary["figure"] = str(args.figure)
    if args.results:
        env = environment(pick_device("cpu"))
        write_results("bf16_vs_fp32_main_job", summary, {}, env, Path(args.results))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
