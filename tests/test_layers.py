"""The package's layers: the import contract in .importlinter holds, every module is placed in
it, and imports sit at the top of files (inside a function only for an optional extra)."""

from __future__ import annotations

import ast
import configparser
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# External packages that may be imported inside a function: optional extras, or heavy parts of
# torch that only some paths need. Nothing of this project.
OPTIONAL = ("diffusers", "matplotlib", "mpi4py", "torch.utils.tensorboard", "torch._dynamo",
            "safetensors")
# Imports of this project inside a function: none (the contract lists no exception).
ALLOWED_INNER: set = set()


def _contract() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".importlinter")
    return cfg


def test_import_contract_is_kept():
    exe = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e .[dev])")
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_every_module_is_placed_in_the_layers():
    layers = _contract()["importlinter:contract:layers"]["layers"]
    named = {m.strip() for line in layers.split("\n") for m in line.replace(":", "|").split("|")}
    modules = {f"guided_diffusion.{p.stem}" for p in (ROOT / "guided_diffusion").glob("*.py")
               if p.stem != "__init__"}
    assert modules - named == set(), "place these modules in .importlinter's layers"
    assert named - modules - {""} == set(), "the contract names modules that do not exist"


def _inner_imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                yield from (a.name for a in inner.names)
            elif isinstance(inner, ast.ImportFrom):
                yield "." * inner.level + (inner.module or "")


def _is_project(name: str) -> bool:
    return name.startswith((".", "guided_diffusion", "evaluations", "datasets"))


@pytest.mark.parametrize("folder", ["guided_diffusion", "evaluations", "scripts"])
def test_imports_inside_functions_are_only_optional_extras(folder):
    """The library: only optional extras inside functions. Scripts: never this project's
    modules (a script may defer a heavy third-party import to the path that needs it)."""
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        rel = str(path.relative_to(ROOT))
        for name in _inner_imports(path):
            if (rel, name) in ALLOWED_INNER:
                continue
            optional = any(name == o or name.startswith(o + ".") for o in OPTIONAL)
            if _is_project(name) or (folder != "scripts" and not optional):
                bad.append(f"{rel}: {name}")
    assert bad == [], "move these imports to the top of the file (or the shared piece down)"
