"""Every third-party module the project imports is declared in setup.cfg: a package that only arrives through
another one (httpx through gradio, yaml through transformers) breaks a fresh `pip install -e .` the day that
other package changes its own dependencies."""

import ast
import configparser
import re
import sys
from importlib.metadata import packages_distributions

from conftest import ROOT


# the project's own modules: root files and folders, and the scripts that import their neighbours
OWN = {
    p.stem
    for folder in (ROOT, ROOT / "tests", ROOT / "benchmarks")
    for p in folder.iterdir()
    if p.suffix == ".py" or (p.is_dir() and not p.name.startswith("."))
}


def requirement_names(text: str) -> set[str]:
    return {
        re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    }


def declared() -> dict[str, set[str]]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    runtime = requirement_names(config["options"]["install_requires"])
    extras = {name: runtime | requirement_names(value) for name, value in config["options.extras_require"].items()}
    return {"runtime": runtime, **extras}


def optional(node, parents) -> bool:
    """An import inside `try: ... except ImportError:` is optional by design (torchvision, for example)."""
    for parent in parents:
        if isinstance(parent, ast.Try) and node in [n for stmt in parent.body for n in ast.walk(stmt)]:
            names = [h.type for h in parent.handlers if h.type is not None]
            if any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in names):
                return True
    return False


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents: dict = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        chain, current = [], node
        while current in parents:
            current = parents[current]
            chain.append(current)
        if not optional(node, chain):
            found |= {name.split(".")[0] for name in names}
    return found - OWN - set(sys.stdlib_module_names)


def files_and_their_install():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if any(part.startswith(".") or part in ("build", "dist", "outputs") for part in parts) or parts == (
            "setup.py",
        ):
            continue
        extra = {"tests": "test", "app.py": "demo"}.get(parts[0], "runtime")
        yield path, extra


def test_every_third_party_import_is_declared_in_setup_cfg():
    distributions = packages_distributions()
    requirements = declared()
    undeclared = []
    for path, extra in files_and_their_install():
        for module in sorted(imported_modules(path)):
            names = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
            if not names & requirements[extra]:
                undeclared.append(
                    f"{path.relative_to(ROOT)}: {module} (distribution {sorted(names)}, install {extra!r})"
                )
    assert not undeclared, "imported but not declared in setup.cfg:\n" + "\n".join(undeclared)
