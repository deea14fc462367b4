"""README.md's two newcomer commands stay true: CI runs exactly the test command it gives."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ci_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [ln for ln in lines if "pytest" in ln][-1].strip()


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert _ci_command() in readme.splitlines(), "README.md's test command and .ci/run differ"


def test_readme_quickstart_command_names_existing_files():
    readme = (ROOT / "README.md").read_text()
    quick = [ln for ln in readme.splitlines() if "quickstart" in ln and ln.startswith("python3 -m venv")]
    assert quick, "README.md lost its quickstart command"
    for path in re.findall(r"(scripts/\S+\.(?:sh|py))", quick[0]):
        assert (ROOT / path).exists(), f"README's quickstart names missing file {path}"
