"""Every flag of the original's seven scripts exists with the original's default.

The ground truth is `fixtures/golden/script_flags.json`, measured on the original's
`create_argparser()`; users' existing command lines depend on these names and defaults.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = json.loads((ROOT / "tests" / "fixtures" / "golden" / "script_flags.json").read_text())


def load_script(relpath: str):
    """Import a script file (scripts/ is not a package) without running its main()."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_all_seven_scripts_are_covered():
    assert len(FLAGS) == 7
    for relpath in FLAGS:
        assert (ROOT / relpath).exists(), relpath


@pytest.mark.parametrize("relpath", sorted(FLAGS))
def test_every_original_flag_has_its_default(relpath):
    parser = load_script(relpath).create_argparser()
    parsed = vars(parser.parse_args([]))
    for flag, default in FLAGS[relpath].items():
        name = flag[2:]
        assert name in parsed, f"{relpath} lost the original flag {flag}"
        value = parsed[name]
        # Same value and same type: "0.9999" (str) and 0.9999 (float) are different flags.
        assert value == default and type(value) is type(default), (
            f"{relpath} {flag}: default {value!r} ({type(value).__name__}), "
            f"original {default!r} ({type(default).__name__})"
        )


@pytest.mark.parametrize("relpath", sorted(FLAGS))
def test_boolean_flags_parse_like_the_original(relpath):
    """The original's str2bool: `--flag True` / `--flag false` / `--flag 1` all work."""
    parser = load_script(relpath).create_argparser()
    bools = [f for f, d in FLAGS[relpath].items() if isinstance(d, bool)]
    assert bools
    for flag in bools:
        assert getattr(parser.parse_args([flag, "True"]), flag[2:]) is True
        assert getattr(parser.parse_args([flag, "false"]), flag[2:]) is False
