"""Load a trained clipqwen model for inference (CLI, demo) without running anyone else's code.

config.json is read as data and anything but model_type "clipqwen" is refused. The model is built
from this package's classes (trust_remote_code=False), never from the .py files beside the weights:
a repository can call itself clipqwen and ship other code. Weights load only from safetensors,
checked against the config first.
"""

import json
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.core_model_loading import revert_weight_conversion
from transformers.utils.hub import cached_file, get_checkpoint_shard_files

from clipqwen import hub
from clipqwen.inference.packed_linear import pack_decoder_linears
from clipqwen.precision import apply_precision, check_precision_available, weights_dtype
from configuration_clipqwen import ClipQwenConfig
from modeling_clipqwen import ClipQwenForConditionalGeneration
from processing_clipqwen import ClipQwenProcessor


AutoConfig.register("clipqwen", ClipQwenConfig, exist_ok=True)
AutoModelForImageTextToText.register(ClipQwenConfig, ClipQwenForConditionalGeneration, exist_ok=True)
AutoProcessor.register(ClipQwenConfig, ClipQwenProcessor, exist_ok=True)


class ModelLoadError(ValueError):
    """A model that cannot be used; the message says why and what to do."""


def refuse_pickled_weights(folder) -> None:
    """A local model folder whose weights exist only as pickles is refused, naming them; nothing is unpickled.
    (With safetensors present, pickles beside them are ignored: only safetensors are ever loaded.)"""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in hub.PICKLE_SUFFIXES)
    if pickles:  # no weights at all is check_weights' message
        raise ModelLoadError(
            f"{folder} has no .safetensors weights, only pickled ones ({', '.join(pickles)}). Only safetensors are "
            "loaded: unpickling a file can run any code it contains. Convert trusted weights with "
            "`model.save_pretrained(folder)` (safetensors is the default), or get a safetensors copy."
        )


def read_model_type(
    model: str, revision: str | None = None, cache_dir: str | None = None, local_files_only: bool = False
) -> str | None:
    """model_type from the config.json of a local folder or a Hub repository, read as plain JSON."""
    if not model.strip():
        raise ModelLoadError(
            "No model given: pass a folder saved with `save_pretrained` or a Hub id like `owner/name`."
        )
    path = Path(model).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"The folder `{model}` has no config.json: it is not a saved model.")
    elif path.exists():
        raise ModelLoadError(f"`{model}` is a file, not a model folder.")
    elif not hub.is_hub_id(model):
        raise ModelLoadError(f"`{model}` is not a model folder (no such directory) nor a Hub id like `owner/name`.")
    else:
        try:
            config_file = hf_hub_download(
                model, "config.json", revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
            )
        except Exception as error:  # noqa: BLE001 - offline, unknown repo or revision, no access, bad id
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
            raise ModelLoadError(
                f"Could not fetch config.json of `{model}`"
                + (f" at revision `{revision}`" if revision else "")
                + f" from the Hugging Face Hub: {reason}. Check the id, the revision and the network, or pass a "
                "local folder (offline, only models already in the local cache open)."
            ) from error
    try:
        return json.loads(Path(config_file).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ModelLoadError(f"The config.json of `{model}` is not a JSON object ({error}).") from error


def weight_files(model: str, revision: str | None = None, cache_dir: str | None = None, **options) -> list[str]:
    """Local paths of the model's safetensors weights (one file, or the shards its index names), fetched the way
    from_pretrained fetches them, so loading afterwards reuses them. `options`: `local_files_only`."""
    options |= {"revision": revision, "cache_dir": cache_dir}
    try:
        single = cached_file(model, "model.safetensors", **options, _raise_exceptions_for_missing_entries=False)
        if single:
            return [single]
        index = cached_file(
            model, "model.safetensors.index.json", **options, _raise_exceptions_for_missing_entries=False
        )
        if index:
            shards = set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values())
            outside = sorted(shard for shard in shards if Path(shard).name != shard)  # "../elsewhere.safetensors"
            if outside:
                raise ModelLoadError(
                    f"The weights index of `{model}` names files outside the model folder "
                    f"({listing(outside)}); it was not loaded."
                )
            return get_checkpoint_shard_files(model, index, **options)[0]
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - a broken index, a shard missing, the Hub out of reach, ...
        raise ModelLoadError(f"The weights of `{model}` cannot be read: {one_line(error)}") from error
    raise ModelLoadError(
        f"`{model}` has a ClipQwen config.json but no weights (no model.safetensors nor "
        "model.safetensors.index.json). Save the model with `save_pretrained`, or copy its weights."
    )


def saved_state_dict(model) -> dict:
    """The model's tensors under the names save_pretrained writes them (the key layout of the first release)."""
    return revert_weight_conversion(model, model.state_dict(keep_vars=True))


def check_weights(model: str, revision: str | None = None, cache_dir: str | None = None, **options) -> None:
    """Refuse safetensors that do not hold every tensor the model needs, at the right shape, before loading them:
    from_pretrained would fill a missing tensor with random values and the model would caption nonsense.
    `options`: `local_files_only`."""
    config = ClipQwenConfig.from_pretrained(model, revision=revision, cache_dir=cache_dir, **options)
    with torch.device("meta"):  # shapes and names only, no memory
        expected = saved_state_dict(ClipQwenForConditionalGeneration(config))
    found = {}
    for file in weight_files(model, revision, cache_dir, **options):
        try:
            with safe_open(file, framework="pt") as weights:  # reads the header only
                found |= {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
        except Exception as error:  # noqa: BLE001 - truncated, not safetensors, ...
            raise ModelLoadError(
                f"`{model}`: {Path(file).name} is not a readable safetensors file "
                f"({one_line(error)}). Re-download or re-export the model."
            ) from error
    # a tied weight (lm_head = embed_tokens) is one tensor under several names, stored under one
    names_of = {}
    for name, tensor in expected.items():
        names_of.setdefault(id(tensor), []).append(name)
    missing = [names[0] for names in names_of.values() if not any(name in found for name in names)]
    wrong = [
        f"{name} {list(found[name])} instead of {list(expected[name].shape)}"
        for name in expected
        if name in found and found[name] != tuple(expected[name].shape)
    ]
    problems = [f"missing {len(missing)} of the {len(names_of)} tensors it needs ({listing(missing)})"] * bool(missing)
    problems += [f"{len(wrong)} tensor(s) of the wrong shape ({listing(wrong)})"] * bool(wrong)
    if problems:
        raise ModelLoadError(
            f"The weights of `{model}` do not match its config: {'; '.join(problems)}. The model "
            "would caption with random weights, so it was not loaded. Re-export it with "
            "`save_pretrained`, or re-download it."
        )


def listing(items: list[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def load_clipqwen(
    model: str,
    revision: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | None = None,
    precision: str | None = None,
    local_files_only: bool = False,
    pack_weights: bool = True,
):
    """(model in eval mode on `device`, processor) for a clipqwen folder or Hub id; ModelLoadError otherwise.
    `precision` (fp32, bf16, int8: clipqwen.precision) sets the weights' dtype and replaces `dtype`; int8 without
    its library raises PrecisionError before anything is read. `local_files_only`: nothing from the Hub, the
    local cache only (what an entry point passes when `hub.hub_out_of_reach`). `pack_weights`: on a CPU, the
    decoder's fp32 / bf16 linears prepacked for oneDNN (packed_linear: the same captions, faster)."""
    if precision is not None:
        check_precision_available(precision)
        dtype = weights_dtype(precision)
    model_type = read_model_type(model, revision, cache_dir, local_files_only)
    if model_type != "clipqwen":
        raise ModelLoadError(
            f"`{model}` is not a ClipQwen captioner: its config.json says model_type "
            f'{json.dumps(model_type)}, not "clipqwen". It was not loaded.'
        )
    refuse_pickled_weights(model)
    options = {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only}
    try:
        check_weights(model, **options)
        # the installed classes: the auto_map pointing at the folder's .py files is never read
        captioner = ClipQwenForConditionalGeneration.from_pretrained(
            model, dtype=dtype, use_safetensors=True, trust_remote_code=False, **options
        )
        processor = ClipQwenProcessor.from_pretrained(model, trust_remote_code=False, **options)
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - a config the classes reject, a broken tokenizer, ...
        raise ModelLoadError(
            f"`{model}` is a ClipQwen config but the model did not load: {one_line(error)}"
        ) from error
    captioner = captioner.to(device).eval()
    if precision is not None:
        apply_precision(captioner, precision)
    if pack_weights:
        pack_decoder_linears(captioner)
    return captioner, processor
