"""scripts/benchmark.py runs end to end on the tiny config and reports a sane table."""

import importlib.util
import json
import pathlib
import sys

import pytest
import torch as th

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_prints_faithful_and_fast_side_by_side(benchmark, capsys, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("GD_CPU_BF16", "1")  # the preset with bf16, whatever this CPU has
    out_json = tmp_path / "bench.json"
    report = benchmark.main(["--config", "tiny", "--runs", "1", "--threads", "1",
                             "--variants", "faithful,fast", "--json", str(out_json)])
    table = capsys.readouterr().out
    assert "| faithful |" in table and "| fast |" in table
    assert "GFLOP/s" in table and "÷ faithful" in table
    faithful, fast_row = report["results"]
    switches = "use_bf16+use_sdpa+channels_last+fused_blocks+fused_adam"
    assert fast_row["switches"] == switches
    assert f"fast: {switches} (CPU bf16 instructions" in table
    # FlopCounterMode counts the convolutions and matmuls: fwd+bwd costs about 3x a forward per
    # image (the backward computes gradients for inputs and weights).
    per_image = {p: report["gflop"][p] / report[f"{p}_batch"] for p in ("train", "sample")}
    assert 2.0 < per_image["train"] / per_image["sample"] < 4.0
    for phase in ("train", "sample"):
        assert faithful[phase]["ratio"] == 1.0
        for row in (faithful, fast_row):
            assert row[phase]["median_s"] > 0 and row[phase]["gflops"] > 0
    assert faithful["rel_err"] == 0.0
    assert 0 < fast_row["rel_err"] < 2e-2  # bf16 ran, within the stated tolerance
    assert json.loads(out_json.read_text())["config"] == "tiny"


def test_unknown_names_are_refused(benchmark):
    with pytest.raises(SystemExit, match="unknown switch 'bf61'"):
        benchmark.variant_flags("faithful+bf61")
    with pytest.raises(SystemExit, match="unknown config"):
        benchmark.main(["--config", "huge"])
    with pytest.raises(SystemExit, match="fp16 needs --device cuda"):
        benchmark.main(["--config", "tiny", "--runs", "1", "--variants", "fp16", "--device", "cpu"])


def test_original_variant_checkpoints_attention_like_the_original(benchmark):
    flags = dict(benchmark.model_and_diffusion_defaults(), **benchmark.CONFIGS["tiny"]["flags"])
    base, _ = benchmark.create_model_and_diffusion(**flags)
    state = base.state_dict()

    def attention(variant):
        return [m for m in variant.model.modules() if isinstance(m, benchmark.AttentionBlock)]

    original = benchmark.Variant("original", flags, state, th.device("cpu"))
    faithful = benchmark.Variant("faithful", flags, state, th.device("cpu"))
    assert attention(original) and all(m.use_checkpoint for m in attention(original))
    assert not any(m.use_checkpoint for m in attention(faithful))


def test_original_path_runs_the_checkouts_own_code_beside_this_package(benchmark, tmp_path):
    """--original_path: the 'original' variant builds its model and trainer with the checkout's
    guided_diffusion package, imported as openai_guided_diffusion (not this project's)."""
    package = tmp_path / "checkout" / "guided_diffusion"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    # A stand-in for the original's modules: this project's factories, marked as called.
    (package / "script_util.py").write_text(
        "from guided_diffusion import script_util as ours\n"
        "CALLS = []\n"
        "def model_and_diffusion_defaults():\n"
        "    return ours.model_and_diffusion_defaults()\n"
        "def create_model_and_diffusion(**flags):\n"
        "    CALLS.append(__name__)\n"
        "    return ours.create_model_and_diffusion(**flags)\n")
    (package / "fp16_util.py").write_text(
        "from guided_diffusion.fp16_util import MixedPrecisionTrainer as _Ours\n"
        "class MixedPrecisionTrainer(_Ours):\n"
        "    def __init__(self, *, model, use_fp16=False):\n"
        "        super().__init__(model=model, use_fp16=use_fp16)\n")
    report = benchmark.main(["--config", "tiny", "--runs", "1", "--threads", "1",
                             "--variants", "original,faithful", "--original_path",
                             str(tmp_path / "checkout")])
    calls = sys.modules["openai_guided_diffusion.script_util"].CALLS
    assert calls == ["openai_guided_diffusion.script_util"] * 2  # training and sampling copies
    original, faithful = report["results"]
    assert original["rel_err"] == 0.0  # same weights, same function
    with pytest.raises(SystemExit, match="--original_path"):
        benchmark.import_original(str(tmp_path / "nowhere"))
    for name in [m for m in sys.modules if m.startswith("openai_guided_diffusion")]:
        del sys.modules[name]  # another test may import another checkout


def test_isolate_times_each_variant_in_its_own_process(benchmark, tmp_path, capsys):
    """--isolate R: R rounds, each variant a separate process; the report merges them (times =
    per-round medians, ratios = medians of per-round ratios) and the table says so."""
    report = benchmark.main(["--config", "tiny", "--runs", "1", "--threads", "1", "--isolate", "2",
                             "--variants", "faithful,sdpa", "--phases", "sample"])
    table = capsys.readouterr().out
    assert report["isolated_rounds"] == 2 and [r["variant"] for r in report["results"]] == [
        "faithful", "sdpa"]
    faithful, sdpa = report["results"]
    assert len(faithful["sample"]["times_s"]) == 2 and faithful["sample"]["ratio"] == 1.0
    ratios = [a / b for a, b in zip(sdpa["sample"]["times_s"], faithful["sample"]["times_s"])]
    assert sdpa["sample"]["ratio"] == pytest.approx(sorted(ratios)[0] / 2 + sorted(ratios)[1] / 2)
    assert sdpa["rel_err"] < 1e-5 and "each variant in its own process, 2 rounds" in table
    with pytest.raises(SystemExit, match="unknown switch"):
        benchmark.main(["--config", "tiny", "--isolate", "1", "--variants", "faithful,bogus"])
