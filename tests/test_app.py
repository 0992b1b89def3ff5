"""The Gradio demo, end to end: `python app.py FOLDER` in a subprocess, driven by Playwright in Debian's headless
Chromium (no browser download). The caption in the page must be exactly what generate() + batch_decode give.
`.ci/install-browser` installs Chromium, gradio and playwright, so CI runs this instead of skipping it."""

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from clipqwen.presets import DEFAULT_PRESET, LAYOUTS
from clipqwen.tiny import bundled_processor

from conftest import PHOTOS, ROOT, clear_greedy_ids, serving_app


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "tests" / "artifacts"
PHOTO = PHOTOS / "000000159269.jpg"  # its tiny-model caption is Latin text, which the machine's fonts render
CODE_RAN = "CODE_FROM_THE_MODEL_FOLDER_RAN"

missing = [name for name in ("gradio", "playwright") if importlib.util.find_spec(name) is None]
if missing or not CHROMIUM.exists():
    pytest.skip(
        f"the demo test needs {', '.join(missing + ([] if CHROMIUM.exists() else [str(CHROMIUM)]))}: "
        "run .ci/install-browser (apt-get install chromium; pip install gradio playwright)",
        allow_module_level=True,
    )

from playwright.sync_api import expect, sync_playwright  # noqa: E402


# assertions wait like actions: two shared CPU cores, and the first click loads the model
expect.set_options(timeout=90_000)


def plant_marker(folder: Path, marker: Path):
    """Make every .py file in a model folder leave a marker when executed: the app must run none of them."""
    for code in folder.glob("*.py"):
        code.write_text(code.read_text() + f"\nopen({str(marker)!r}, 'w').write({CODE_RAN!r})\n")


MISSING_HUB_ID = "nobody-here/clipqwen-missing"
MAX_IMAGES = 2
MODEL_DECODING = {"num_beams": 2, "max_new_tokens": 5}  # what the demo's controls must start from


@pytest.fixture
def served_app(make_model, tmp_path):
    """(url, model, processor, folder, other, marker): the app serving a tiny saved model whose bundled code must never
    run, whose generation_config decodes with MODEL_DECODING and whose processor holds the default layout's prompt
    (`Image:`), plus (allowed by the operator) a folder of another model type and a Hub id that cannot be reached."""
    processor = bundled_processor(prompt=LAYOUTS[DEFAULT_PRESET]["prompt"])
    model = make_model()
    model.generation_config.update(**MODEL_DECODING)
    folder = tmp_path / "clipqwen-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    marker = tmp_path / "code-ran"
    plant_marker(folder, marker)
    other = tmp_path / "not-clipqwen"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoConfig": "evil.Config"}}))
    (other / "evil.py").write_text("")
    plant_marker(other, marker)

    with serving_app(
        tmp_path, str(folder), "--allowed_models", f"{other},{MISSING_HUB_ID}", "--max_images", str(MAX_IMAGES)
    ) as (url, _):
        yield url, model, processor, folder, other, marker


@pytest.fixture
def page(tmp_path):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",
            executable_path=str(CHROMIUM),
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        browser.set_default_timeout(90_000)  # two shared CPU cores: the first click also loads the model
        yield browser.new_page()
        browser.close()


def pick_model(page, label: str):
    page.locator("#model input").click()
    page.get_by_role("option", name=label, exact=True).click()
    expect(page.locator("#model input")).to_have_value(label)


def test_demo_captions_like_generate_and_reports_bad_input(served_app, page, tmp_path):
    url, model, processor, folder, other, marker = served_app
    # the server is another process: compared exactly only where no greedy step is a near tie
    inputs = processor(images=[Image.open(PHOTO)])
    ids = clear_greedy_ids(model, inputs, max_new_tokens=8)
    expected = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :])[0]  # the caption, not the prompt
    assert expected and processor.prompt.startswith("Image:")  # an empty caption: the comparison means nothing

    page.goto(url)
    expect(page.get_by_text("CC BY-SA 2.0").first).to_be_visible()  # the example photos' attribution
    expect(page.locator("#model input")).to_have_value(str(folder))
    page.locator("#model input").click()  # the model box offers exactly the operator's models
    options = [text.removeprefix("✓").strip() for text in page.get_by_role("option").all_inner_texts()]
    assert options == [str(folder), str(other), MISSING_HUB_ID]
    page.keyboard.press("Escape")
    # the decoding controls start from the model's generation_config (the page's load event reads it)
    expect(page.locator("#num-beams input[type=number]")).to_have_value(str(MODEL_DECODING["num_beams"]))
    expect(page.locator("#max-new-tokens input[type=number]")).to_have_value(str(MODEL_DECODING["max_new_tokens"]))
    page.locator("#images input[type=file]").set_input_files(PHOTO)
    page.locator(f'#images td.filename[aria-label="{PHOTO.name}"]').wait_for()  # uploaded
    for slider, value in (("#num-beams", "1"), ("#max-new-tokens", "8")):  # greedy, 8 tokens
        box = page.locator(f"{slider} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#caption-button").click()
    expect(page.locator("#status")).to_contain_text("Captioned 1 image in")
    assert page.locator("#captions textarea").input_value() == f"{PHOTO.name}: {expected}"
    expect(page.locator("#results .caption-label")).to_have_text(expected)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "app.png", full_page=True)
    assert not marker.exists(), "the app executed .py files from the model folder"

    # A text file named .jpg: a readable message, no caption, no stack trace.
    fake = tmp_path / "notes.jpg"
    fake.write_text("shopping list: milk, eggs\n")
    page.locator("#images button[aria-label=Clear]").click()
    page.locator("#images input[type=file]").set_input_files(fake)
    page.locator('#images td.filename[aria-label="notes.jpg"]').wait_for()
    page.locator("#caption-button").click()
    expect(page.locator("#status")).to_contain_text("Cannot load image notes.jpg")
    assert page.locator("#captions textarea").input_value() == ""
    assert "Traceback" not in page.content()

    # More images than --max_images: the first ones are captioned, the rest named and left undecoded.
    photos = sorted(PHOTOS.glob("*.jpg"))[: MAX_IMAGES + 1]
    page.locator("#images button[aria-label=Clear]").click()
    page.locator("#images input[type=file]").set_input_files(photos)
    page.locator(f'#images td.filename[aria-label="{photos[-1].name}"]').wait_for()
    page.locator("#caption-button").click()
    expect(page.locator("#status")).to_contain_text(f"Captioned {MAX_IMAGES} images in")
    expect(page.locator("#status")).to_contain_text(f"1 image(s) left out ({photos[-1].name})")

    # An allowed model folder of another type is refused before anything in it is loaded; so is an unreachable Hub id.
    pick_model(page, str(other))
    page.locator("#caption-button").click()
    expect(page.locator("#status")).to_contain_text('model_type "bert", not "clipqwen"')
    pick_model(page, MISSING_HUB_ID)
    page.locator("#caption-button").click()
    expect(page.locator("#status")).to_contain_text(f"Could not fetch config.json of {MISSING_HUB_ID}")
    assert not marker.exists()
