"""ClipQwen captioning demo: drop in photos, read the captions.

    python app.py [MODEL] [--revision REV] [--allowed_models A,B@REV] [--precision auto|fp32|bf16|int8]
                  [--max_images N] [--max_request_mb MB] [--max_queue N] [--host 127.0.0.1] [--port 7860]

MODEL is a `save_pretrained` folder or Hub id (default: $CLIPQWEN_MODEL at $CLIPQWEN_REVISION). As a
Hugging Face Space, push this repository as it is (app.py, requirements.txt at its root). Visitors
pick only among the served models, opened by clipqwen.inference.loading; requests are capped in images and
bytes, captioned one at a time, and queued up to a bound (docs/reliability.md).
"""

import argparse
import functools
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch

from clipqwen import hub
from clipqwen.images import printable
from clipqwen.inference import captioning
from clipqwen.inference.captioning import CAPTION_GENERATION, caption_generation_config
from clipqwen.inference.loading import ModelLoadError
from clipqwen.inference.packed_linear import decoding_path
from clipqwen.precision import PrecisionError, resolve_precision


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXAMPLES = Path(__file__).resolve().parent / "examples" / "coco-cc-by"
EXAMPLE_PHOTOS = sorted(str(path) for path in EXAMPLES.glob("*.jpg"))
ATTRIBUTION = (
    "Example photos: [MS-COCO](https://cocodataset.org) 2017 images from Flickr, licensed "
    "[CC BY 2.0](https://creativecommons.org/licenses/by/2.0/) or "
    "[CC BY-SA 2.0](https://creativecommons.org/licenses/by-sa/2.0/); sources under *Example photo credits*."
)
BEAM, SAMPLING = "Beam search", "Sampling"
# Per request: each image is decoded in full, then captioned; these bound its time and memory.
MAX_IMAGES = 16
MAX_REQUEST_MB = 64
MAX_PREFIX_CHARS = 200  # a prompt prefix is a few words; a long one only makes every caption slower
# Requests waiting behind the one being captioned (it takes every core); more are refused at once
# rather than held, each with its uploads in memory, until they time out.
MAX_QUEUE = 16
# The decoding sliders' ranges; a model's own setting outside one widens it.
BEAMS, TEMPERATURE, TOP_P, NEW_TOKENS = (1, 8), (0.1, 2.0), (0.05, 1.0), (1, 64)


def photo_credits() -> str:
    """Per-photo licence and source, from the examples' metadata.jsonl (see that folder's README.md)."""
    lines = (EXAMPLES / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line]
    table = "\n".join(f"| {row['file_name']} | {row['license']} | <{row['flickr_url']}> |" for row in rows)
    return (
        "Photos from the MS-COCO 2017 train/val sets whose Flickr licence allows redistribution with attribution; "
        "COCO's annotations are CC BY 4.0.\n\n| photo | licence | source |\n|---|---|---|\n" + table
    )


def served_models(model: str, revision: str | None, allowed: list[str]) -> dict[str, tuple[str, str | None]]:
    """What the model box offers: label -> (folder or Hub id, revision). MODEL at --revision first, then each
    --allowed_models entry, where `owner/name@rev` pins a Hub revision."""
    served = {}
    if model:
        served[f"{model}@{revision}" if revision else model] = (model, revision or None)
    for entry in allowed:
        name, _, rev = entry.rpartition("@") if "@" in entry and not Path(entry).is_dir() else (entry, "", "")
        served.setdefault(entry, (name, rev or None))
    return served


@dataclass(frozen=True)
class Serving:
    """What main() decides for every request: the models visitors may pick (`served_models`), their precision,
    whether they load from the local cache only (the Hub out of reach), and the limits of a request and the queue."""

    served: dict[str, tuple[str, str | None]]
    precision: str = "auto"
    local_files_only: bool = False
    max_images: int = MAX_IMAGES
    max_request_mb: float = MAX_REQUEST_MB
    max_queue: int = MAX_QUEUE


_MODELS: dict[tuple, tuple] = {}  # (model, revision, precision) -> (model, processor), the last two loaded
_LOADING = threading.Lock()  # a page opening (model_decoding) and a caption request may ask for a model at once


def get_model(choice: str, serving: Serving):
    """Load (or reuse) a served model and its processor in the served precision. Any other name is refused unseen,
    with one message whatever it names: no answer reveals which folders or repos exist."""
    if choice not in serving.served:
        labels = ", ".join(f"`{label}`" for label in serving.served)
        raise ModelLoadError(f"This demo serves only {labels}: pick one in the model box.")
    key = (*serving.served[choice], resolve_precision(serving.precision, DEVICE))
    with _LOADING:
        if key not in _MODELS:
            loaded = captioning.load(
                key[0], key[1], device=DEVICE, precision=key[2], local_files_only=serving.local_files_only
            )
            while len(_MODELS) >= 2:
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[key] = loaded
        return _MODELS[key]


def within_limits(files: list[str], max_images: int, max_bytes: int) -> tuple[list[str], str | None]:
    """The files of a request up to max_images and max_bytes (sizes from the file system, nothing decoded), and
    a note naming what was left out."""
    kept, total = [], 0
    for file in files:
        try:
            size = os.path.getsize(file)
        except OSError:
            size = 0  # load_image says what is wrong with it
        if len(kept) == max_images or total + size > max_bytes:
            break
        kept.append(file)
        total += size
    if len(kept) == len(files):
        return kept, None
    left_out = ", ".join(Path(file).name for file in files[len(kept) :][:3]) + ", ..." * (len(files) - len(kept) > 3)
    return kept, (
        f"⚠️ {len(files) - len(kept)} image(s) left out ({left_out}): a request takes at most {max_images} "
        f"images and {max_bytes / 2**20:g} MB. Caption them in another request."
    )


def upload_name(file: str) -> str:
    """An upload's name as the visitor gave it (the server's temporary folder means nothing to them), printable."""
    return printable(Path(file).name)


def decoding_values(generation_config=None) -> dict:
    """What the decoding controls show for a model's generation_config (None: a model that sets nothing)."""
    config = caption_generation_config(generation_config)
    return {
        "decoding": SAMPLING if config.do_sample else BEAM,
        "num_beams": config.num_beams,
        # unset: 1, which leaves the model's distribution as it is (what generate() does)
        "temperature": 1.0 if config.temperature is None else config.temperature,
        "top_p": 1.0 if config.top_p is None else config.top_p,
        # a model that caps the length with max_length (prompt included) instead: the project's cap
        "max_new_tokens": config.max_new_tokens or CAPTION_GENERATION["max_new_tokens"],
    }


def widened(value, bounds: tuple) -> dict:
    """A slider's value and a range (`bounds`, widened) that holds it."""
    return {"value": value, "minimum": min(bounds[0], value), "maximum": max(bounds[1], value)}


def model_decoding(choice: str, *, serving: Serving) -> list:
    """Updates of the status and the decoding controls, set from the model's generation_config.
    The page is built before any model loads (a Space must answer at once), so this loads it; a
    model that does not load leaves the controls as they are and says why."""
    try:
        captioner, _ = get_model(choice, serving)
    except (ModelLoadError, PrecisionError) as error:
        return [gr.update()] * 5 + [f"⚠️ {error}"]
    values = decoding_values(captioner.generation_config)
    sampling = values["decoding"] == SAMPLING
    return [
        gr.update(value=values["decoding"]),
        gr.update(**widened(values["num_beams"], BEAMS), visible=not sampling),
        gr.update(**widened(values["temperature"], TEMPERATURE), visible=sampling),
        gr.update(**widened(values["top_p"], TOP_P), visible=sampling),
        gr.update(**widened(values["max_new_tokens"], NEW_TOKENS)),
        "",
    ]


def caption(
    files,
    model,
    decoding,
    num_beams,
    temperature,
    top_p,
    max_new_tokens,
    prefix,
    *,
    serving: Serving,
):
    """The Caption button, given the page's inputs in order -> (gallery of (image, caption), captions as text, status
    in Markdown)."""
    prefix = prefix or ""
    if len(prefix) > MAX_PREFIX_CHARS:
        return [], "", f"⚠️ The prompt prefix has {len(prefix):,} characters; at most {MAX_PREFIX_CHARS} are allowed."
    taken, left_out = within_limits(files or [], serving.max_images, int(serving.max_request_mb * 2**20))
    images, read, unreadable = captioning.read_images(taken, upload_name)
    names = [upload_name(file) for file in read]
    problems = [left_out] * bool(left_out) + [f"⚠️ {problem}" for problem in unreadable]
    if not files:
        problems.append("Add one or more images: drop them in, or click an example photo.")
    try:
        started = time.perf_counter()
        captioner, processor = get_model(model, serving)
        loading = time.perf_counter() - started
    except (ModelLoadError, PrecisionError) as error:
        return [], "", "\n\n".join([f"⚠️ {error}"] + problems)
    if not images:
        return [], "", "\n\n".join(problems)

    started = time.perf_counter()
    sampling = decoding == SAMPLING
    try:
        generation = captioning.generation_config(
            captioner.generation_config,
            do_sample=sampling,
            num_beams=None if sampling else int(num_beams),
            temperature=float(temperature),
            top_p=float(top_p),
            max_new_tokens=int(max_new_tokens),
        )
        captions = captioning.caption_images(captioner, processor, images, generation, prefix)
    except Exception as error:  # noqa: BLE001 - out of memory, an option the model rejects, ...
        return [], "", "\n\n".join([f"⚠️ Captioning failed: {type(error).__name__}: {error}"] + problems)
    seconds = time.perf_counter() - started

    status = (
        f"Captioned {len(images)} image{'s' * (len(images) > 1)} in {seconds:.2f} s on {DEVICE} "
        f"({decoding_path(captioner)})"
    )
    status += f" ({seconds / len(images):.2f} s per image)" if len(images) > 1 else ""
    status += f"; loading the model took {loading:.1f} s." if loading > 0.5 else "."
    text = "\n".join(f"{name}: {text}" for name, text in zip(names, captions))
    return list(zip(images, captions)), text, "\n\n".join([status] + problems)


def add_example(files, event: gr.SelectData):
    photo = EXAMPLE_PHOTOS[event.index]
    files = files or []
    return files if Path(photo).name in {Path(file).name for file in files} else files + [photo]


def build_demo(serving: Serving) -> gr.Blocks:
    with gr.Blocks(title="ClipQwen captioner") as demo:
        gr.Markdown("# ClipQwen image captioner\nimage tower → projector → language model, one transformers model.")
        with gr.Row():
            with gr.Column():
                choices = list(serving.served)
                model = gr.Dropdown(choices, value=choices[0], label="Model", elem_id="model")
                files = gr.File(
                    label="Images", file_count="multiple", file_types=["image"], height=180, elem_id="images"
                )
                if EXAMPLE_PHOTOS:
                    examples = gr.Gallery(
                        EXAMPLE_PHOTOS,
                        label="Example photos (click to add)",
                        columns=4,
                        height=260,
                        object_fit="cover",
                        allow_preview=False,
                        interactive=False,
                        elem_id="examples",
                    )
                    examples.select(add_example, inputs=files, outputs=files)
                    gr.Markdown(ATTRIBUTION, elem_id="attribution")
                with gr.Accordion("Generation options"):
                    # what a model that sets nothing gets, until the page's load event reads the model's own
                    start = decoding_values()
                    sampling = start["decoding"] == SAMPLING
                    decoding = gr.Radio(
                        [BEAM, SAMPLING], value=start["decoding"], label="Decoding", elem_id="decoding"
                    )
                    num_beams = gr.Slider(
                        **widened(start["num_beams"], BEAMS),
                        step=1,
                        label="Beams (1 = greedy)",
                        visible=not sampling,
                        elem_id="num-beams",
                    )
                    temperature = gr.Slider(
                        **widened(start["temperature"], TEMPERATURE),
                        step=0.05,
                        label="Temperature",
                        visible=sampling,
                        elem_id="temperature",
                    )
                    top_p = gr.Slider(
                        **widened(start["top_p"], TOP_P), step=0.05, label="Top-p", visible=sampling, elem_id="top-p"
                    )
                    max_new_tokens = gr.Slider(
                        **widened(start["max_new_tokens"], NEW_TOKENS),
                        step=1,
                        label="Max new tokens",
                        elem_id="max-new-tokens",
                    )
                    prefix = gr.Textbox(
                        label="Prompt prefix (optional; the caption continues it)",
                        max_length=MAX_PREFIX_CHARS,
                        elem_id="prefix",
                    )
                decoding.change(  # beams for beam search; temperature and top-p for sampling
                    lambda choice: [gr.update(visible=choice == BEAM)] + [gr.update(visible=choice == SAMPLING)] * 2,
                    inputs=decoding,
                    outputs=[num_beams, temperature, top_p],
                )
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(
                    label="Captions", columns=2, height=420, object_fit="contain", fit_columns=False, elem_id="results"
                )
                text = gr.Textbox(label="Captions as text", lines=4, buttons=["copy"], elem_id="captions")
        if EXAMPLE_PHOTOS:
            with gr.Accordion("Example photo credits", open=False):
                gr.Markdown(photo_credits())
        inputs = [files, model, decoding, num_beams, temperature, top_p, max_new_tokens, prefix]
        # outside the queue: opening the page never waits behind captioning, nor is refused by a full queue
        from_model = dict(
            fn=functools.partial(model_decoding, serving=serving),
            inputs=model,
            outputs=[decoding, num_beams, temperature, top_p, max_new_tokens, status],
            queue=False,
            api_visibility="private",
        )
        demo.load(**from_model)
        model.change(**from_model)
        button.click(
            functools.partial(caption, serving=serving),
            inputs=inputs,
            outputs=[gallery, text, status],
            api_name="caption",
        )
    return demo.queue(max_size=serving.max_queue, default_concurrency_limit=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=os.environ.get("CLIPQWEN_MODEL", ""), help="folder or Hub id")
    parser.add_argument(
        "--revision", default=os.environ.get("CLIPQWEN_REVISION", ""), help="Hub branch, tag or commit"
    )
    parser.add_argument(
        "--allowed_models",
        default="",
        help="more models visitors may pick, comma-separated folders or Hub ids (owner/name@rev "
        "pins a revision); default: only MODEL",
    )
    parser.add_argument("--max_images", type=int, default=MAX_IMAGES, help="images read per request")
    parser.add_argument("--max_request_mb", type=float, default=MAX_REQUEST_MB, help="megabytes read per request")
    parser.add_argument(
        "--max_queue",
        type=int,
        default=MAX_QUEUE,
        help="requests that may wait while one is captioned; more are refused with a message",
    )
    captioning.add_precision_argument(  # of every served model
        parser, os.environ.get("CLIPQWEN_PRECISION", "auto"), " (default, or $CLIPQWEN_PRECISION)"
    )
    parser.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    args = parser.parse_args(argv)
    served = served_models(args.model, args.revision, [e.strip() for e in args.allowed_models.split(",") if e.strip()])
    if not served:
        parser.error("no model to serve: pass MODEL (or set $CLIPQWEN_MODEL), or --allowed_models")
    if args.max_images < 1 or args.max_request_mb <= 0 or args.max_queue < 1:
        parser.error("--max_images, --max_request_mb and --max_queue must be positive")
    try:  # a missing library is said now, not at the first visitor's click
        captioning.runnable_precision(args.precision, DEVICE)
    except PrecisionError as error:
        parser.error(str(error))
    # an unreachable Hub: served Hub ids load from the local cache, or fail at once instead of after retries
    offline = hub.hub_out_of_reach([name for name, _ in served.values()])
    serving = Serving(
        served,
        precision=args.precision,
        local_files_only=offline,
        max_images=args.max_images,
        max_request_mb=args.max_request_mb,
        max_queue=args.max_queue,
    )
    demo = build_demo(serving)
    # max_file_size: Gradio refuses a larger upload while it arrives, before it reaches caption().
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        allowed_paths=[str(EXAMPLES)],
        max_file_size=int(args.max_request_mb * 2**20),
    )


if __name__ == "__main__":
    main()
