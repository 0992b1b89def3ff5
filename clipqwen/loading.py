"""Load a trained clipqwen model for inference (caption CLI, demo app) without running anyone else's code.

A model's config.json is read as data first, and anything whose model_type is not "clipqwen" is refused.
The model is then built from this installed package's classes (registered with the Auto classes, loaded
with trust_remote_code=False), never from the .py files shipped beside the weights — a repository can call
itself clipqwen and still ship other code. Weights load only from safetensors: no pickle is unpickled.
"""

import json
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from configuration_clipqwen import ClipQwenConfig
from modeling_clipqwen import ClipQwenForConditionalGeneration
from processing_clipqwen import ClipQwenProcessor

AutoConfig.register("clipqwen", ClipQwenConfig, exist_ok=True)
AutoModelForImageTextToText.register(ClipQwenConfig, ClipQwenForConditionalGeneration, exist_ok=True)
AutoProcessor.register(ClipQwenConfig, ClipQwenProcessor, exist_ok=True)


class ModelLoadError(ValueError):
    """A model that cannot be used; the message says why and what to do."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_pickled_weights(folder) -> None:
    """A local model folder whose weights exist only as pickles is refused, naming them; nothing is unpickled.
    (With safetensors present, pickles beside them are ignored: only safetensors are ever loaded.)"""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    raise ModelLoadError(
        f"{folder} has no .safetensors weights" + (f", only pickled ones ({', '.join(pickles)})" if pickles else "")
        + ". Only safetensors are loaded: unpickling a file can run any code it contains. Convert trusted weights "
          "with `model.save_pretrained(folder)` (safetensors is the default), or get a safetensors copy."
    )


def read_model_type(model: str, revision: str | None = None) -> str | None:
    """model_type from the config.json of a local folder or a Hub repository, read as plain JSON."""
    path = Path(model).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"The folder `{model}` has no config.json: it is not a saved model.")
    elif path.exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"`{model}` is not a model folder (no such directory) nor a Hub id like `owner/name`.")
    else:
        try:
            config_file = hf_hub_download(model, "config.json", revision=revision)
        except Exception as error:  # noqa: BLE001 - offline, unknown repo or revision, no access, bad id
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
            raise ModelLoadError(
                f"Could not fetch config.json of `{model}`" + (f" at revision `{revision}`" if revision else "")
                + f" from the Hugging Face Hub: {reason}. Check the id, the revision and the network, or pass a "
                "local folder (offline, only models already in the local cache open)."
            ) from error
    try:
        return json.loads(Path(config_file).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ModelLoadError(f"The config.json of `{model}` is not a JSON object ({error}).") from error


def load_clipqwen(model: str, revision: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
                  cache_dir: str | None = None):
    """(model in eval mode on `device`, processor) for a clipqwen folder or Hub id; ModelLoadError otherwise."""
    model_type = read_model_type(model, revision)
    if model_type != "clipqwen":
        raise ModelLoadError(f"`{model}` is not a ClipQwen captioner: its config.json says model_type "
                             f"{json.dumps(model_type)}, not \"clipqwen\". It was not loaded.")
    refuse_pickled_weights(model)
    options = {"revision": revision, "cache_dir": cache_dir, "trust_remote_code": False}
    try:
        # The installed classes themselves, so the auto_map that points at the folder's .py files is never consulted.
        captioner = ClipQwenForConditionalGeneration.from_pretrained(model, dtype=dtype, use_safetensors=True, **options)
        processor = ClipQwenProcessor.from_pretrained(model, **options)
    except Exception as error:  # noqa: BLE001 - missing or pickled weights, wrong shapes, ...
        raise ModelLoadError(f"`{model}` is a ClipQwen config but the model did not load: {error}") from error
    return captioner.to(device).eval(), processor
