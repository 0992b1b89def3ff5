"""Shared fixtures. Everything runs offline: the Hub is switched off before transformers is imported, and
HF_HOME points at a temporary folder so nothing from this machine's cache leaks into a test."""

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="clipqwen-hf-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Hub files live at the repository root

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from clipqwen.tiny import bundled_processor, tiny_config  # noqa: E402
from modeling_clipqwen import ClipQwenForConditionalGeneration  # noqa: E402


PHOTOS = ROOT / "examples" / "coco-cc-by"
# run_captioning.py flags of a quick run on the tiny test model, for the tests that run the script in-process
TINY = [
    "--tiny_model",
    "--report_to",
    "none",
    "--per_device_train_batch_size",
    "4",
    "--save_strategy",
    "no",
    "--dataloader_pin_memory",
    "False",
    "--disable_tqdm",
    "True",
]

# Identical weights can give outputs a few units in the last place apart: oneDNN/BLAS pick kernels per process,
# thread count and tensor alignment (weights read from a safetensors file sit at other offsets), and they round
# differently. Outputs computed in two processes are compared within this; saved and reloaded weights exactly.
ROUNDING = dict(rtol=1e-5, atol=1e-6)


def clear_greedy_ids(model, batch, margin: float = 1e-4, **generate_kwargs) -> torch.Tensor:
    """Greedy ids of `model` on `batch`, after checking that at every step the best score leads the next by more
    than `margin` (far above ROUNDING): only then can ids or captions from another process be compared exactly,
    since no rounding there can make it pick another token."""
    with torch.no_grad():
        out = model.generate(
            **batch, **generate_kwargs, do_sample=False, num_beams=1, output_scores=True, return_dict_in_generate=True
        )
    for step, scores in enumerate(out.scores):
        best, second = scores.float().topk(2, dim=-1).values.unbind(-1)
        gap = (best - second).min().item()
        assert gap > margin, (
            f"greedy step {step}: the two best tokens are {gap:.1e} apart, so close that another "
            f"process may pick either; compare on another input or seed"
        )
    return out.sequences


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving_app(tmp_path: Path, *args: str):
    """`python app.py ARGS` on 127.0.0.1 and a free port: yields (url, server process) once the page answers, stops
    it afterwards and prints its log (pytest shows it when the test failed)."""
    port, log = free_port(), tmp_path / "app.log"
    env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    with open(log, "w") as output:
        server = subprocess.Popen(
            [sys.executable, "app.py", *args, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"app.py did not start serving {url}:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        print(log.read_text()[-3000:])


@pytest.fixture(scope="session")
def processor():
    return bundled_processor()


@pytest.fixture
def make_model():
    def make(seed: int = 0, **config_overrides):
        torch.manual_seed(seed)
        return ClipQwenForConditionalGeneration(tiny_config(**config_overrides)).eval()

    return make


@pytest.fixture(scope="session")
def photos():
    return [Image.open(path) for path in sorted(PHOTOS.glob("*.jpg"))[:4]]


@pytest.fixture(scope="session")
def runtime_python():
    """A Python with only what a user's `pip install -e .` installs (no test extras), for the runtime smoke tests:
    $CLIPQWEN_RUNTIME_PYTHON (.ci/run makes one with the pinned versions and one with the newest allowed), else a
    venv in build/, made once per setup.cfg + constraints.txt."""
    if os.environ.get("CLIPQWEN_RUNTIME_PYTHON"):
        return os.environ["CLIPQWEN_RUNTIME_PYTHON"]
    stamp = hashlib.sha256((ROOT / "setup.cfg").read_bytes() + (ROOT / "constraints.txt").read_bytes()).hexdigest()
    venv = ROOT / "build" / "runtime-venv"
    python = venv / "bin" / "python"
    if not (venv / "stamp").is_file() or (venv / "stamp").read_text() != stamp:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build on this machine's disk
        subprocess.run([*pip, "-e", str(ROOT), "-c", str(ROOT / "constraints.txt")], check=True)
        (venv / "stamp").write_text(stamp)
    return str(python)


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode with no Hub: its endpoint a closed port (connection refused at once; a network that drops
    packets silently costs the probe's 3 s timeout)."""
    import datasets.config
    from huggingface_hub import constants

    from clipqwen import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "_PROBES", {})


def transformers_common_tests():
    """transformers' own common test modules — `test_modeling_common` and `test_configuration_common` — from the
    sdist of the installed transformers version, for tests/test_transformers_common.py. The sdist is fetched once with
    `pip download --no-binary` into build/transformers-sdist (ignored by git, never copied into the repository) and
    its tests/ folder is imported as the package `transformers_sdist_tests`. Raises, naming what to do, when the sdist
    cannot be had: a silent skip would hide that the common tests did not run.

    The sdist ships tests/*.py but not their subpackages; three imports of test_modeling_common /
    test_configuration_common are then given stand-ins (only where the file is absent):
    `generation.test_utils.GenerationTesterMixin` (an empty class: the generate tests themselves cannot run),
    `exporters.test_export.ExportTesterMixin` (an empty mixin: no export tests), and
    `utils.test_configuration_utils.config_common_kwargs` (`{}`: read only by `check_config_arguments_init`, which
    returns before reading it for a composite config such as ClipQwen's)."""
    import importlib
    import shutil
    import tarfile
    import types

    import transformers

    version = transformers.__version__
    cache = ROOT / "build" / "transformers-sdist"
    tests = cache / f"transformers-{version}" / "tests"
    if not (tests / "test_modeling_common.py").is_file():
        archive = cache / f"transformers-{version}.tar.gz"
        if not archive.is_file():
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--quiet",
                f"transformers=={version}",
                "--dest",
                str(cache),
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0 or not archive.is_file():
                raise RuntimeError(
                    f"transformers' common tests come from the transformers {version} sdist, which could not be "
                    f"downloaded ({' '.join(command)}: {result.stderr.strip()[-500:]}). Run it with access to PyPI, "
                    f"or put transformers-{version}.tar.gz in {cache}."
                )
        partial = Path(tempfile.mkdtemp(dir=cache))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"transformers-{version}/tests/")]
            tar.extractall(partial, members=members, filter="data")
        if not tests.is_dir():
            tests.parent.mkdir(exist_ok=True)
            os.replace(partial / f"transformers-{version}" / "tests", tests)  # atomic: never half a folder
        shutil.rmtree(partial, ignore_errors=True)
    # test_configuration_common executes tests/__init__.py (empty in transformers' repository, absent from the sdist)
    (tests / "__init__.py").touch()

    try:
        import parameterized  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "transformers' common tests need the `parameterized` package: pip install parameterized "
            "(or pip install -e '.[test]')."
        ) from error
    package = "transformers_sdist_tests"
    if package not in sys.modules:
        root = types.ModuleType(package)
        root.__path__ = [str(tests)]
        sys.modules[package] = root
        stand_ins = {
            "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
            "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
            "utils.test_configuration_utils": {"config_common_kwargs": {}},
        }
        for name, attributes in stand_ins.items():
            folder, module = name.split(".")
            if (tests / folder / f"{module}.py").is_file():
                continue
            parent = sys.modules.setdefault(f"{package}.{folder}", types.ModuleType(f"{package}.{folder}"))
            parent.__path__ = []
            stand_in = types.ModuleType(f"{package}.{name}")
            stand_in.__dict__.update(attributes, STAND_IN=True)
            sys.modules[f"{package}.{name}"] = stand_in
    return (
        importlib.import_module(f"{package}.test_modeling_common"),
        importlib.import_module(f"{package}.test_configuration_common"),
    )


def pytest_configure(config):
    # marks that transformers' common tests (test_transformers_common.py) carry; the tests they mark skip themselves
    # here (no flash attention, no accelerator)
    marks = ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test")
    for mark in marks:
        config.addinivalue_line("markers", f"{mark}: a transformers common-test mark")
