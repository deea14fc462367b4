"""scripts/make_synthetic_imagenet.py writes a deterministic ImageNet-layout folder (and finishes an
interrupted one); scripts/data_benchmark.py measures start-up, loader and step on it."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest
from PIL import Image

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_db_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # worker processes find the script's functions by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synth():
    return _script("make_synthetic_imagenet")


def test_synthetic_folder_has_imagenet_layout_and_is_deterministic(synth, tmp_path, capsys):
    synth.main(["--out", str(tmp_path / "a"), "--num_images", "12", "--num_classes", "3",
                "--workers", "2"])
    synth.main(["--out", str(tmp_path / "b"), "--num_images", "12", "--num_classes", "3",
                "--workers", "1"])
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.JPEG"))
    assert len(files) == 12 and str(files[0]) == "n00000000/n00000000_0.JPEG"
    assert {p.parent.name for p in files} == {"n00000000", "n00000001", "n00000002"}
    for rel in files:  # the same bytes whatever the number of writers
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    with Image.open(tmp_path / "a" / files[0]) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        assert max(image.size) == 500 and 333 <= min(image.size) <= 400
    # An interrupted generation finishes: only the missing file is written.
    (tmp_path / "a" / files[5]).unlink()
    capsys.readouterr()
    synth.main(["--out", str(tmp_path / "a"), "--num_images", "12", "--num_classes", "3"])
    assert "wrote 1 of 12 images" in capsys.readouterr().out
    assert (tmp_path / "a" / files[5]).read_bytes() == (tmp_path / "b" / files[5]).read_bytes()


def test_data_benchmark_reports_startup_loader_and_step(synth, tmp_path, capsys):
    synth.main(["--out", str(tmp_path / "data"), "--num_images", "24", "--num_classes", "2",
                "--workers", "1"])
    out_json = tmp_path / "report.json"
    _script("data_benchmark").main([
        "--data_dir", str(tmp_path / "data"), "--image_sizes", "16", "--workers", "0,1",
        "--batch_size", "4", "--seconds", "0.05", "--checks", "header,full",
        "--step_configs", "32:tiny", "--step_batch", "1", "--threads", "1",
        "--json", str(out_json)])
    table = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    header, full = report["startup"]
    for row in (header, full):
        assert row["images"] == 24 and row["checked_first"] == 24 and row["checked_restart"] == 0
    assert (header["check"], full["check"]) == ("header", "full")
    assert [(r["image_size"], r["workers"]) for r in report["loader"]] == [(16, 0), (16, 1)]
    assert all(r["images_per_s"] > 0 and r["images"] >= 8 and r["cpu_ms_per_image"] > 0
               for r in report["loader"])
    (step,) = report["step"]
    assert step["config"] == "tiny" and step["batch"] == 1 and step["images_per_s"] > 0
    assert "| 16 | 1 |" in table and "restart / first" in table and "(CPU s)" in table
    assert "| tiny (faithful) |" in table
    assert header["first_start_cpu_s"] > 0 and header["restart_cpu_s"] >= 0
