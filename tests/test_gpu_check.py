"""
scripts/gpu_check.py end to end in its CPU smoke mode: the report's fields, their arithmetic, the
all-reduce path (gloo between two CPU processes stands in for NCCL) and the skip line without GPUs.
The CUDA numbers themselves can only be measured on a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch as th

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "smoke.json"
    # The preset with bf16 whatever this CPU has, so the fast row's label is known.
    env = dict(os.environ, OMP_NUM_THREADS="1", GD_CPU_BF16="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--smoke", "--out",
         str(out), "--allreduce", "gloo"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def test_smoke_report_has_every_field(smoke_report):
    report, stdout = smoke_report
    assert report["smoke"] is True and report["runs"] == 1 and report["torch"] == th.__version__
    (layout,) = report["layouts"]
    assert layout["layout"] == "tiny" and layout["num_params"] > 0
    # On a CPU: the faithful float32 path and the bf16 fast path (the original's fp16 is CUDA-only).
    assert [r["precision"] for r in layout["rows"]] == ["fp32", "fast-bf16"]
    for r in layout["rows"]:
        for key in ("sample_images_per_s", "sample_forward_s", "sample_tflops", "train_step_s",
                    "train_tflops", "sample_peak_mib", "train_peak_mib", "rel_err_vs_fp32"):
            assert isinstance(r[key], float) and r[key] >= 0, key
        assert r["sample_forward_s"] > 0 and r["train_step_s"] > 0
        # The derived columns are the measured time and the counted FLOPs, nothing else.
        assert r["sample_images_per_s"] == pytest.approx(
            layout["sample_batch"] / r["sample_forward_s"])
        assert r["sample_tflops"] * 1e3 * r["sample_forward_s"] == pytest.approx(
            layout["gflop_per_sample_forward_batch"])
        assert r["train_tflops"] * 1e3 * r["train_step_s"] == pytest.approx(
            layout["gflop_per_train_step_batch"])
    assert layout["rows"][0]["rel_err_vs_fp32"] == 0.0  # fp32 against itself
    assert 0 < layout["rows"][1]["rel_err_vs_fp32"] < 0.05  # bf16: close, not equal
    assert "| tiny (batch 2/2) | fp32 |" in stdout and "| fast-bf16 |" in stdout


def test_fast_rows_are_labelled_by_the_precision_the_preset_chose():
    label = gpu_check.precision_label
    assert label("fast", "use_bf16+use_sdpa+channels_last+fused_blocks+fused_adam") == "fast-bf16"
    assert label("fast", "use_sdpa+channels_last+fused_blocks+fused_adam+use_fp16") == "fast-fp16"
    assert label("fast", "use_sdpa+channels_last+fused_blocks+fused_adam") == "fast-fp32"
    assert label("faithful", "faithful") == "fp32" and label("fp16", "use_fp16") == "fp16"


def test_smoke_allreduce_sums_across_two_processes(smoke_report):
    report, stdout = smoke_report
    ar = report["allreduce"]
    assert ar["backend"] == "gloo" and ar["ok"] is True  # every element == world size
    assert ar["mib"] == 1 and len(ar["times_s"]) == 3 and ar["busbw_gb_s"] > 0
    # busbw = 2 (n - 1) / n * bytes / t with n = 2: bytes / t.
    assert ar["busbw_gb_s"] == pytest.approx(2**20 / ar["median_s"] / 1e9)
    assert "all-reduce (gloo, 2 processes, 1 MiB)" in stdout and "result correct" in stdout


def test_allreduce_is_skipped_with_a_line_without_two_gpus(monkeypatch):
    monkeypatch.setattr(th.cuda, "is_available", lambda: True)
    monkeypatch.setattr(th.cuda, "device_count", lambda: 1)
    res = gpu_check.allreduce_check("auto", mib=1, iters=1)
    assert res == {"skipped": "all-reduce check needs 2 GPUs, found 1"}
    with pytest.raises(SystemExit, match="--allreduce nccl: needs 2 GPUs, found 1"):
        gpu_check.allreduce_check("nccl", mib=1, iters=1)


def test_full_check_uses_the_readme_layouts():
    import benchmark

    assert gpu_check.FULL_LAYOUTS == ("adm64", "adm256")
    adm64, adm256 = (benchmark.CONFIGS[n]["flags"] for n in gpu_check.FULL_LAYOUTS)
    # The original README's 64x64 conditional ADM and 256x256 ADM flags.
    assert (adm64["image_size"], adm64["num_channels"], adm64["num_res_blocks"]) == (64, 192, 3)
    assert adm64["noise_schedule"] == "cosine" and adm64["use_new_attention_order"]
    assert (adm256["image_size"], adm256["num_channels"], adm256["num_res_blocks"]) == (256, 256, 2)
    assert adm256["num_head_channels"] == 64 and adm256["class_cond"]
