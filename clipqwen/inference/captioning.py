"""Captioning with a trained model: what the caption CLI and the demo app share.

Both front doors load through `load` (clipqwen.inference.loading's safety rules, one precision), decode as the model's
generation_config says unless the user sets something (`generation_config`), read files through `read_images`
(names shown with `printable`) and caption with `caption_images`, which returns only the new tokens: never the
prompt the processor wrote before them.
"""

import argparse
import copy

import torch
from transformers import GenerationConfig

from ..images import ImageLoadError, load_image, printable
from ..precision import PRECISIONS, check_precision_available, resolve_precision
from .loading import load_clipqwen


DECODING = ("num_beams", "max_new_tokens", "do_sample", "temperature", "top_p")  # what a user may set
PRECISION_HELP = (
    "weights: fp32, bf16, or int8 weight-only decoder (needs the `quantize` extra); auto{default}: bf16 on GPUs "
    "and on CPUs with native bf16, fp32 elsewhere"
)


# Decoding where a model's generation_config says nothing (folders not exported by run_captioning):
# else transformers stops at its own length, and an untrained model may give an empty caption.
CAPTION_GENERATION = {"max_new_tokens": 30, "min_new_tokens": 1, "num_beams": 1}


def caption_generation_config(generation_config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
    """A copy of the model's `generation_config` (the one source of decoding), CAPTION_GENERATION
    where it is silent (`max_length` / `min_length` count as set), then each override not None."""
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    counts_as = {"max_new_tokens": "max_length", "min_new_tokens": "min_length"}
    unset = {
        name: value
        for name, value in CAPTION_GENERATION.items()
        if getattr(config, name) is None and getattr(config, counts_as.get(name, name)) is None
    }
    unknown = config.update(**(unset | {name: value for name, value in overrides.items() if value is not None}))
    if unknown:
        raise TypeError(f"Not generation settings: {', '.join(unknown)}")
    return config


def add_precision_argument(parser: argparse.ArgumentParser, default: str = "auto", default_help: str = "") -> None:
    """`--precision auto|fp32|bf16|int8`; `default_help` says where its default comes from."""
    parser.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default=default,
        help=PRECISION_HELP.format(default=default_help),
    )


def runnable_precision(precision: str | None, device: str) -> str:
    """`precision` resolved for `device` (auto → the machine's default), after checking that its library is
    installed: for a front door that must say so before any model is asked for (PrecisionError)."""
    resolved = resolve_precision(precision, device)
    check_precision_available(resolved)
    return resolved


def load(
    model: str,
    revision: str | None = None,
    *,
    device: str = "cpu",
    precision: str | None = "auto",
    local_files_only: bool = False,
):
    """(model, processor) as clipqwen.inference.loading opens them (this package's code, safetensors checked against
    the config), in `precision` on `device`; `local_files_only`: the local cache only (the entry point found the Hub
    out of reach: `hub.hub_out_of_reach`). Raises ModelLoadError or PrecisionError."""
    return load_clipqwen(
        model,
        revision,
        device=device,
        precision=resolve_precision(precision, device),
        local_files_only=local_files_only,
    )


def generation_config(
    model_generation_config,
    *,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
):
    """The model's generation_config (the project's decoding where it says nothing) with each setting given
    (None: the model's). Sampling asked for without a beam count samples with one beam, not with the model's
    beams; temperature and top-p apply only when sampling, as they mean nothing to greedy or beam search."""
    settings = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=do_sample)
    if do_sample and num_beams is None:
        settings["num_beams"] = 1
    config = caption_generation_config(model_generation_config, **settings)
    if config.do_sample:
        config = caption_generation_config(config, temperature=temperature, top_p=top_p)
    return config


def read_images(files: list, shown=lambda file: printable(str(file))) -> tuple[list, list, list[str]]:
    """(the images decoded, the files they came from, what was wrong with each other file: one line each).
    `shown(file)` is the name the messages use."""
    images, read, problems = [], [], []
    for file in files:
        try:
            images.append(load_image(file, name=shown(file)))
            read.append(file)
        except ImageLoadError as error:
            problems.append(str(error))
    return images, read, problems


def caption_images(model, processor, images: list, generation=None, prompt: str = "") -> list[str]:
    """One caption per image, in one batch: `prompt` (else the processor's saved prompt) after the image, and
    only the tokens generated after it decoded."""
    inputs = processor(images=images, text=[prompt] * len(images)).to(model.device)
    with torch.inference_mode():
        ids = model.generate(**inputs, generation_config=generation)
    return processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :])
