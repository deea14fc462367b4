"""logger: the original's API writing stdout/log/csv/json, env configuration, weighted means."""

import csv
import json

import pytest

from guided_diffusion import logger


@pytest.fixture(autouse=True)
def _reset():
    yield
    logger.reset()


def test_dumpkvs_writes_every_format_and_averages_logkv_mean(tmp_path, capsys):
    logger.configure(dir=str(tmp_path), format_strs=["stdout", "log", "csv", "json"])
    assert logger.get_dir() == str(tmp_path)
    logger.log("hello", 3)
    logger.logkv("step", 1)
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 2.0)
    logger.logkv_mean("loss", 6.0, count=2)  # a batch of two with mean 6
    out = logger.dumpkvs()
    assert out == {"step": 1, "loss": pytest.approx(3.75)}
    assert logger.getkvs() == {}  # cleared after the dump
    logger.logkv("step", 2)
    logger.logkv("grad_norm", 0.5)  # a new key: the CSV gains a column
    logger.dumpkvs()

    stdout = capsys.readouterr().out
    assert "hello 3" in stdout and "| loss" in stdout and "3.75" in stdout
    text = (tmp_path / "log.txt").read_text()
    assert text.startswith(f"Logging to {tmp_path}") and "hello 3" in text
    with open(tmp_path / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["loss"] == "3.75" and rows[0]["grad_norm"] == ""
    assert rows[1] == {"loss": "", "step": "2", "grad_norm": "0.5"}
    lines = (tmp_path / "progress.json").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 3.75}, {"step": 2, "grad_norm": 0.5}
    ]


def test_configure_reads_openai_logdir_and_format(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "run"))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "json,log")
    logger.configure()
    logger.logkv("a", 1)
    logger.dumpkvs()
    assert logger.get_dir() == str(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.txt", "progress.json"]


def test_csv_resumes_with_the_existing_columns(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    logger.logkvs({"step": 1, "loss": 0.5})
    logger.dumpkvs()
    logger.configure(dir=str(tmp_path), format_strs=["csv"])  # e.g. a resumed run
    logger.logkvs({"step": 2, "loss": 0.25})
    logger.dumpkvs()
    with open(tmp_path / "progress.csv") as f:
        rows = list(csv.reader(f))
    assert rows == [["loss", "step"], ["0.5", "1"], ["0.25", "2"]]


def test_weighted_mean_across_ranks():
    per_rank = [
        {"loss": (1.0, 1), "step": (5, 1), "name": ("run", 1)},
        {"loss": (4.0, 3), "step": (5, 1), "name": ("run", 1)},
    ]
    assert logger._weighted_mean(per_rank) == {"loss": 3.25, "step": 5.0, "name": "run"}


def test_levels_and_scoped_configure(tmp_path, capsys):
    logger.configure(dir=str(tmp_path / "a"), format_strs=["stdout"])
    logger.set_level(logger.WARN)
    logger.info("hidden")
    logger.warn("shown")
    with logger.scoped_configure(dir=str(tmp_path / "b"), format_strs=["log"]):
        logger.log("inside")
        assert logger.get_dir() == str(tmp_path / "b")
    assert logger.get_dir() == str(tmp_path / "a")
    out = capsys.readouterr().out
    assert "shown" in out and "hidden" not in out and "inside" not in out
    assert "inside" in (tmp_path / "b" / "log.txt").read_text()
    with pytest.raises(ValueError, match="unknown log format 'bogus'"):
        logger.configure(dir=str(tmp_path), format_strs=["bogus"])
