"""Every Python block of the README runs as written, offline, against a tiny model saved where the README
says a trained one lives. Blocks marked `<!-- needs: hub -->` run against the local Hub stand-in in test_online.py."""

import os
import re
import subprocess
import sys

from conftest import ROOT


BLOCK = re.compile(r"(<!-- needs: hub -->\n)?```python\n(.*?)```", re.DOTALL)


def readme_blocks():
    return [(bool(hub), code) for hub, code in BLOCK.findall((ROOT / "README.md").read_text())]


def test_the_readme_has_the_python_blocks_users_copy():
    codes = [code for _, code in readme_blocks()]
    assert any("AutoModelForImageTextToText" in code and "generate" in code for code in codes)
    assert any('pipeline("image-text-to-text"' in code for code in codes)
    assert any("from_pretrained_backbones" in code for code in codes)


def test_readme_python_blocks_run_offline(make_model, processor, tmp_path):
    folder = tmp_path / "outputs" / "embedded-tiny"
    make_model().save_pretrained(folder)
    processor.save_pretrained(folder)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    script = "\n\n".join(code for hub, code in readme_blocks() if not hub)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated_text" in result.stdout  # the pipeline block printed its result
