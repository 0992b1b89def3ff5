"""A saved folder must load with trust_remote_code in a fresh process that cannot import the project: the code
has to come from the folder itself."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from clipqwen.inference.loading import saved_state_dict

from conftest import PHOTOS, ROUNDING, clear_greedy_ids


CHILD = textwrap.dedent(
    """
    import json, os, sys, torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline
    from transformers.core_model_loading import revert_weight_conversion
    folder, photo = sys.argv[1], sys.argv[2]
    assert "modeling_clipqwen" not in sys.modules
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)) is type(model)
    state = revert_weight_conversion(model, model.state_dict())  # the names save_pretrained writes
    saved = load_file(os.path.join(folder, "model.safetensors"))
    image = Image.open(photo)
    batch = processor(images=[image])
    with torch.no_grad():
        logits = model(**batch).logits
        ids = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    captioner = pipeline("image-text-to-text", model=model, processor=processor)
    piped = captioner(images=image, text="", generate_kwargs={"max_new_tokens": 6, "min_new_tokens": 6})
    print(json.dumps({
        "module": type(model).__module__,
        "weights_not_as_saved": sorted(k for k, v in saved.items() if k not in state or not torch.equal(state[k], v)),
        "logits": logits[0, -1, :50].tolist(), "ids": ids.tolist(), "pipeline": piped[0]["generated_text"],
        "decoded": processor.batch_decode(ids[:, batch["input_ids"].shape[1]:])[0],
        "decoder": type(model.get_decoder()).__name__,
        "image_token_id": model.config.image_token_id, "processor_image_token_id": processor.image_token_id,
    }))
    """
)


def load_in_fresh_process(folder, photo, workdir):
    """Run CHILD on `folder` in a new Python, from `workdir`, with the project off the path; its JSON report."""
    workdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(photo)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_fresh_process_matches(model, processor, folder, photo, workdir):
    """The folder, loaded with trust_remote_code in a fresh process, holds this model's weights bit for bit and gives
    its logits (within ROUNDING) and captions."""
    state = saved_state_dict(model)
    saved = load_file(folder / "model.safetensors")
    assert saved and all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    child = load_in_fresh_process(folder, photo, workdir)
    assert child["module"].startswith("transformers_modules")  # loaded from the folder, not the project
    assert child["weights_not_as_saved"] == []

    from PIL import Image

    batch = processor(images=[Image.open(photo)])
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(torch.tensor(child["logits"]), logits[0, -1, :50], **ROUNDING)
    ids = clear_greedy_ids(model, batch, max_new_tokens=6, min_new_tokens=6)
    assert child["ids"] == ids.tolist()
    # the caption alone: the pipeline, like a user, leaves out the prompt the processor wrote before it
    caption = processor.batch_decode(ids[:, batch["input_ids"].shape[1] :])[0]
    assert child["pipeline"].strip() == child["decoded"] == caption
    return child


def test_saved_folder_loads_in_a_fresh_process_with_identical_outputs(make_model, processor, tmp_path):
    model = make_model()
    folder = tmp_path / "clipqwen-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    files = set(os.listdir(folder))
    code = {"configuration_clipqwen.py", "modeling_clipqwen.py", "processing_clipqwen.py"}
    assert {"model.safetensors", "config.json", *code} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    processor_auto_map = json.loads((folder / "processor_config.json").read_text())["auto_map"]
    assert processor_auto_map["AutoProcessor"] == "processing_clipqwen.ClipQwenProcessor"

    photo = sorted(PHOTOS.glob("*.jpg"))[0]
    child = assert_fresh_process_matches(model, processor, folder, photo, tmp_path / "elsewhere")
    assert child["decoder"] == "Qwen3Model"
    assert child["image_token_id"] == child["processor_image_token_id"] == 151655


HUB_FILES = ("configuration_clipqwen.py", "modeling_clipqwen.py", "processing_clipqwen.py")


def test_the_hub_files_name_nothing_a_hub_user_does_not_have():
    """Who loads the model with trust_remote_code has these three files, not the clipqwen package nor its docs:
    their messages speak transformers' terms (resize_token_embeddings, config.image_token_id)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in HUB_FILES:
        with open(os.path.join(root, name), encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                assert "clipqwen." not in line and "docs/" not in line, f"{name}:{number}: {line.strip()}"
