"""ClipQwen captioning demo: drop in photos, read the captions.

    python app.py [MODEL] [--revision REV] [--host 127.0.0.1] [--port 7860]

MODEL is a folder written by `save_pretrained` or a Hub id; the default comes from $CLIPQWEN_MODEL (and
$CLIPQWEN_REVISION). As a Hugging Face Space, push this repository as it is: app.py and requirements.txt
at the root, beside the three *_clipqwen.py files and the clipqwen/ package they import.

Safety: models open through clipqwen.loading, which refuses anything that is not a clipqwen model and builds
it from this repository's own classes, never from the .py files shipped beside the weights.
"""

import argparse
import json
import os
import time
from pathlib import Path

import gradio as gr
import torch

from clipqwen.images import ImageLoadError, load_image
from clipqwen.loading import ModelLoadError, load_clipqwen

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
EXAMPLES = Path(__file__).resolve().parent / "examples" / "coco-cc-by"
EXAMPLE_PHOTOS = sorted(str(path) for path in EXAMPLES.glob("*.jpg"))
ATTRIBUTION = (
    "Example photos: [MS-COCO](https://cocodataset.org) 2017 images from Flickr, licensed "
    "[CC BY 2.0](https://creativecommons.org/licenses/by/2.0/) or "
    "[CC BY-SA 2.0](https://creativecommons.org/licenses/by-sa/2.0/); sources under *Example photo credits*."
)
BEAM, SAMPLING = "Beam search", "Sampling"


def photo_credits() -> str:
    """Per-photo licence and source, from the examples' metadata.jsonl (see that folder's README.md)."""
    rows = [json.loads(line) for line in (EXAMPLES / "metadata.jsonl").read_text(encoding="utf-8").splitlines() if line]
    table = "\n".join(f"| {row['file_name']} | {row['license']} | <{row['flickr_url']}> |" for row in rows)
    return (
        "Photos from the MS-COCO 2017 train/val sets whose Flickr licence allows redistribution with attribution; "
        "COCO's annotations are CC BY 4.0.\n\n| photo | licence | source |\n|---|---|---|\n" + table
    )


_MODELS: dict[tuple[str, str | None], tuple] = {}  # (model, revision) -> (model, processor), the last two loaded


def get_model(model: str, revision: str | None):
    """Load (or reuse) a ClipQwen model and its processor; refuse anything else before any of it is loaded."""
    model, revision = model.strip(), (revision or "").strip() or None
    if not model:
        raise ModelLoadError("Enter a model: a folder saved with `save_pretrained`, or a Hub id like `owner/name`.")
    if Path(model).expanduser().is_dir():
        model, revision = str(Path(model).expanduser().resolve()), None  # a folder has no revisions
    key = (model, revision)
    if key not in _MODELS:
        loaded = load_clipqwen(model, revision, device=DEVICE, dtype=DTYPE)
        while len(_MODELS) >= 2:
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[key] = loaded
    return _MODELS[key]


def generation_options(decoding, num_beams, temperature, top_p, max_new_tokens) -> dict:
    if decoding == SAMPLING:
        options = {"do_sample": True, "num_beams": 1, "temperature": float(temperature), "top_p": float(top_p)}
    else:
        options = {"do_sample": False, "num_beams": int(num_beams)}
    return options | {"max_new_tokens": int(max_new_tokens)}


def caption(files, model, revision, decoding, num_beams, temperature, top_p, max_new_tokens, prefix):
    """-> (gallery of (image, caption), captions as text, status in Markdown)."""
    images, names, problems = [], [], []
    for file in files or []:
        name = Path(file).name
        try:
            images.append(load_image(file, name=name))
            names.append(name)
        except ImageLoadError as error:
            problems.append(f"⚠️ {error}")
    if not files:
        problems.append("Add one or more images: drop them in, or click an example photo.")
    try:
        started = time.perf_counter()
        captioner, processor = get_model(model, revision)
        loading = time.perf_counter() - started
    except ModelLoadError as error:
        return [], "", "\n\n".join([f"⚠️ {error}"] + problems)
    if not images:
        return [], "", "\n\n".join(problems)

    started = time.perf_counter()
    try:
        batch = processor(images=images, text=[prefix] * len(images) if prefix else None).to(DEVICE)
        options = generation_options(decoding, num_beams, temperature, top_p, max_new_tokens)
        with torch.inference_mode():
            ids = captioner.generate(**batch, **options)
    except Exception as error:  # noqa: BLE001 - out of memory, an option the model rejects, ...
        return [], "", "\n\n".join([f"⚠️ Captioning failed: {type(error).__name__}: {error}"] + problems)
    captions = processor.batch_decode(ids)
    seconds = time.perf_counter() - started

    status = f"Captioned {len(images)} image{'s' * (len(images) > 1)} in {seconds:.2f} s on {DEVICE}"
    status += f" ({seconds / len(images):.2f} s per image)" if len(images) > 1 else ""
    status += f"; loading the model took {loading:.1f} s." if loading > 0.5 else "."
    text = "\n".join(f"{name}: {text}" for name, text in zip(names, captions))
    return list(zip(images, captions)), text, "\n\n".join([status] + problems)


def add_example(files, event: gr.SelectData):
    photo = EXAMPLE_PHOTOS[event.index]
    files = files or []
    return files if Path(photo).name in {Path(file).name for file in files} else files + [photo]


def build_demo(default_model: str = "", default_revision: str = "") -> gr.Blocks:
    with gr.Blocks(title="ClipQwen captioner") as demo:
        gr.Markdown("# ClipQwen image captioner\nCLIP image features → adapter → Qwen3, one transformers model.")
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    model = gr.Textbox(default_model, label="Model (folder or Hub id)", scale=3, elem_id="model")
                    revision = gr.Textbox(default_revision, label="Revision", placeholder="main", elem_id="revision")
                files = gr.File(
                    label="Images", file_count="multiple", file_types=["image"], height=180, elem_id="images"
                )
                if EXAMPLE_PHOTOS:
                    examples = gr.Gallery(
                        EXAMPLE_PHOTOS, label="Example photos (click to add)", columns=4, height=260,
                        object_fit="cover", allow_preview=False, interactive=False, elem_id="examples",
                    )
                    examples.select(add_example, inputs=files, outputs=files)
                    gr.Markdown(ATTRIBUTION, elem_id="attribution")
                with gr.Accordion("Generation options"):
                    decoding = gr.Radio([BEAM, SAMPLING], value=BEAM, label="Decoding", elem_id="decoding")
                    num_beams = gr.Slider(1, 8, value=3, step=1, label="Beams (1 = greedy)", elem_id="num-beams")
                    temperature = gr.Slider(0.1, 2, value=0.7, step=0.05, label="Temperature", visible=False,
                                            elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p", visible=False, elem_id="top-p")
                    max_new_tokens = gr.Slider(1, 64, value=30, step=1, label="Max new tokens",
                                               elem_id="max-new-tokens")
                    prefix = gr.Textbox(label="Prompt prefix (optional; the caption continues it)", elem_id="prefix")
                decoding.change(  # beams for beam search; temperature and top-p for sampling
                    lambda choice: [gr.update(visible=choice == BEAM)] + [gr.update(visible=choice == SAMPLING)] * 2,
                    inputs=decoding, outputs=[num_beams, temperature, top_p],
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
        inputs = [files, model, revision, decoding, num_beams, temperature, top_p, max_new_tokens, prefix]
        button.click(caption, inputs=inputs, outputs=[gallery, text, status])
    return demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=os.environ.get("CLIPQWEN_MODEL", ""), help="folder or Hub id")
    parser.add_argument("--revision", default=os.environ.get("CLIPQWEN_REVISION", ""), help="Hub branch, tag or commit")
    parser.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    args = parser.parse_args(argv)
    demo = build_demo(args.model, args.revision)
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(EXAMPLES)])


if __name__ == "__main__":
    main()
