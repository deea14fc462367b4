"""iCT (Song & Dhariwal 2023) for consistency training: the N curriculum, the discrete lognormal
pairs and the inverse-step weighting, each against its formula written out here; then a training
run whose N changes, resumed bit for bit, and cm_distill.py's defaults left as they were."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import statistics

import numpy as np
import pytest
import torch as th

from guided_diffusion import logger, sample_util
from guided_diffusion.cm_train import CMTrainLoop
from guided_diffusion.config import ConsistencyConfig
from guided_diffusion.consistency import (
    ConsistencyDistillation,
    PairSampler,
    cm_defaults,
    cm_timesteps,
    ict_num_scales,
    lognormal_pair_probs,
    num_scales_at,
    training_grid,
)
from guided_diffusion.resample import UniformSampler
from guided_diffusion.script_util import create_gaussian_diffusion, create_model

from conftest import assert_same_values

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# The curriculum: N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1))


@pytest.mark.parametrize("k,total,s0,s1,expected", [
    # The paper's s0 = 10, s1 = 1280 over K = 800: log2(128) + 1 = 8 stages, K' = 100.
    (0, 800, 10, 1280, 11), (99, 800, 10, 1280, 11), (100, 800, 10, 1280, 21),
    (250, 800, 10, 1280, 41), (699, 800, 10, 1280, 641), (700, 800, 10, 1280, 1281),
    (799, 800, 10, 1280, 1281),  # the last step: s1 + 1
    # s1 not a power-of-2 multiple of s0: floor(20 / 3) = 6, log2(6) + 1 = 3.585, K' = floor(2.79)
    # = 2; 3 * 2^3 = 24 is capped at s1 = 20.
    (0, 10, 3, 20, 4), (1, 10, 3, 20, 4), (2, 10, 3, 20, 7), (5, 10, 3, 20, 13),
    (6, 10, 3, 20, 21), (9, 10, 3, 20, 21),
    # s0 = s1: one stage, N fixed at s0 + 1.
    (0, 5, 7, 7, 8), (4, 5, 7, 7, 8),
])
def test_ict_num_scales_is_the_papers_formula(k, total, s0, s1, expected):
    assert ict_num_scales(k, total, s0, s1) == expected


def test_the_curriculum_is_capped_to_the_grid_and_bad_flags_are_named():
    # A 1000-point grid holds N <= 1000: s1 = 1280 becomes 999. floor(999 / 10) = 99,
    # log2(99) + 1 = 7.629, K' = floor(800 / 7.629) = 104.
    at = [num_scales_at(k, 1000, 10, "ict", 1280, 800) for k in (0, 103, 104, 727, 728, 799)]
    assert at == [11, 11, 21, 641, 1000, 1000]
    assert num_scales_at(5, 1000, 18, "none", 1280, 0) == 18  # no curriculum: --cm_steps
    with pytest.raises(ValueError, match="--lr_anneal_steps"):
        num_scales_at(0, 1000, 10, "ict", 1280, 0)
    with pytest.raises(ValueError, match="shorter than the curriculum's 8 stages"):
        ict_num_scales(0, 7, 10, 1280)
    with pytest.raises(ValueError, match="--cm_steps"):
        num_scales_at(0, 20, 30, "ict", 1280, 100)  # s0 above the capped s1 = 19
    # The grid's points stay distinct at the cap: N = 40 on a 40-point grid is every point.
    diffusion = create_gaussian_diffusion(steps=40)
    cd = ConsistencyDistillation(diffusion, None, create_model(16, 32, 1, channel_mult="1,2"),
                                 num_scales=5, curriculum="ict", num_scales_max=1280,
                                 total_steps=4, noise_dist="uniform")
    cd.set_step(3)
    assert cd.num_scales == 40 and list(cd.timesteps) == list(range(40))


# ------------------------------------------------------------------------------------------------
# The pairs' distribution and weights


def _phi(x):
    """ln sigma's CDF, N(-1.1, 2^2), by the standard library (not erf)."""
    return statistics.NormalDist(-1.1, 2.0).cdf(math.log(x))


def test_lognormal_pair_probs_match_the_formula_and_the_draws():
    sig = [0.01, 0.1, 1.0, 10.0, 80.0]
    p = lognormal_pair_probs(sig)
    erf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sig]
    by_erf = [b - a for a, b in zip(erf, erf[1:])]
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert p == pytest.approx([x / sum(by_erf) for x in by_erf], rel=1e-12)
    by_cdf = [_phi(b) - _phi(a) for a, b in zip(sig, sig[1:])]
    assert p == pytest.approx([x / sum(by_cdf) for x in by_cdf], rel=1e-9)
    # One value by hand: Phi((ln 1 + 1.1) / 2) - Phi((ln 0.1 + 1.1) / 2), over the total mass
    # Phi((ln 80 + 1.1) / 2) - Phi((ln 0.01 + 1.1) / 2).
    def cdf(s):
        return 0.5 * (1 + math.erf((math.log(s) + 1.1) / 2.0 / math.sqrt(2)))

    assert p[1] == pytest.approx((cdf(1.0) - cdf(0.1)) / (cdf(80) - cdf(0.01)), rel=1e-12)

    class Loss:
        pair_probs = p

    np.random.seed(0)
    draws, weights = PairSampler(Loss()).sample(40000, "cpu")
    assert th.equal(weights, th.ones(40000))  # p(n) is the objective's, no importance weights
    counts = np.bincount(draws.numpy(), minlength=len(p))
    expected = 40000 * p
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (counts, expected)  # chi-square, 3 degrees of freedom, p = 0.001
    with pytest.raises(ValueError, match="increasing"):
        lognormal_pair_probs([1.0, 1.0, 2.0])


def test_the_loss_draws_its_pairs_from_the_current_grid_with_ict_weights():
    """On a real grid: p(n) and lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n) of sigma~ =
    sqrt((1 - abar) / abar) at the N points, for the N of each step (`--cm_weighting
    inverse_step` is iCT's weighting)."""
    diffusion = create_gaussian_diffusion(steps=100)
    acp = np.asarray(diffusion.alphas_cumprod)
    cd = ConsistencyDistillation(diffusion, None, create_model(16, 32, 1, channel_mult="1,2"),
                                 num_scales=4, curriculum="ict", num_scales_max=16,
                                 total_steps=6, noise_dist="lognormal", weighting="inverse_step")
    assert isinstance(cd.pair_sampler(), PairSampler)
    seen = []
    for k in range(6):
        cd.set_step(k)
        seen.append(cd.num_scales)
        ts = cm_timesteps(acp, cd.num_scales, "karras")
        sig = np.sqrt((1 - acp[ts]) / acp[ts])
        assert list(cd.timesteps) == list(ts) and cd.num_timesteps == cd.num_scales - 1
        cdf = [_phi(s) for s in sig]
        mass = np.diff(cdf)
        assert cd.pair_probs == pytest.approx(mass / mass.sum(), rel=1e-8)
        assert cd.weights == pytest.approx(1.0 / (sig[1:] - sig[:-1]), rel=1e-12)
    # log2(16 / 4) + 1 = 3 stages of K' = 2 steps: N - 1 = 4, 8, 16.
    assert seen == [5, 5, 9, 9, 17, 17]


# ------------------------------------------------------------------------------------------------
# Training: N changes within the run; a resume continues it bit for bit


CT_ICT = dict(training_mode="consistency_training", cm_steps=2, cm_steps_max=8,
              cm_curriculum="ict", cm_noise_dist="lognormal", cm_weighting="inverse_step",
              target_ema=0.0)


def make_ct_loop(log_dir, data, resume="", **flags):
    logger.configure(dir=str(log_dir), format_strs=["csv"])
    th.manual_seed(0)
    np.random.seed(0)
    model = create_model(16, 32, 1, channel_mult="1,2", attention_resolutions="8")
    diffusion = create_gaussian_diffusion(steps=40, noise_schedule="cosine")
    return CMTrainLoop(
        model=model, diffusion=diffusion, teacher=None, cm=ConsistencyConfig(**flags),
        data=iter(data), batch_size=4, microbatch=2, lr=1e-3, ema_rate="0.9", log_interval=1,
        save_interval=100, resume_checkpoint=resume, lr_anneal_steps=6)


def test_ct_with_the_curriculum_resumes_bit_for_bit(tmp_path, monkeypatch):
    """K = 6, s0 = 2, s1 = 8: N = 3, 3, 5, 5, 9, 9. Stop after step 3 (N has changed once),
    resume with `auto`: student, target, EMA and AdamW moments equal the uninterrupted run's
    (N is a function of the step, the pairs come from the saved NumPy RNG state)."""
    g = th.Generator().manual_seed(0)
    data = [(th.rand(4, 3, 16, 16, generator=g) * 2 - 1, {}) for _ in range(6)]
    try:
        whole = make_ct_loop(tmp_path / "whole", data, **CT_ICT)
        assert isinstance(whole.schedule_sampler, PairSampler)
        whole.run_loop()
        monkeypatch.setenv("DIFFUSION_TRAINING_TEST", "1")  # stop after the first save
        first = make_ct_loop(tmp_path / "split", data, **CT_ICT)
        first.save_interval = 3
        first.run_loop()
        monkeypatch.delenv("DIFFUSION_TRAINING_TEST")
        assert first.step == 3 and (tmp_path / "split" / "target000003.pt").exists()
        second = make_ct_loop(tmp_path / "split", data[3:], resume="auto", **CT_ICT)
        assert second.resume_step == 3
        second.run_loop()
    finally:
        logger.reset()
    with open(tmp_path / "whole" / "progress.csv") as f:
        assert [int(float(r["cm_scales"])) for r in csv.DictReader(f)] == [3, 3, 5, 5, 9, 9]
    for name in ("model000006.pt", "target000006.pt", "ema_0.9_000006.pt", "opt000006.pt"):
        assert_same_values(th.load(tmp_path / "whole" / name, weights_only=True),
                           th.load(tmp_path / "split" / name, weights_only=True), name)
    assert not th.equal(whole.model.out[-1].weight, first.model.out[-1].weight)  # it trained
    flags = th.load(tmp_path / "split" / "opt000006.pt", weights_only=True)["resume"]
    assert flags["train_flags"]["cm_curriculum"] == "ict"
    # The student ends on the grid of N = 9: K-step sampling takes its levels there; a
    # checkpoint of step 3 (its last step k = 2) was last trained on N = 5.
    run = {**cm_defaults(), **CT_ICT, "lr_anneal_steps": 6}
    diffusion = whole.diffusion.diffusion
    acp = diffusion.alphas_cumprod
    assert list(training_grid(acp, run)) == list(cm_timesteps(acp, 9, "karras"))
    (tmp_path / "whole" / "args.json").write_text(json.dumps(run))  # as cm_distill.py writes
    for name, n in [("model000003.pt", 5), ("ema_0.9_000002.pt", 3), ("target000006.pt", 9),
                    ("released.pt", 9)]:
        grid = sample_util.consistency_grid(str(tmp_path / "whole" / name), diffusion)
        assert list(grid) == list(cm_timesteps(acp, n, "karras")), name
    old = {k: v for k, v in run.items() if k not in ("cm_curriculum", "cm_steps_max")}
    assert list(training_grid(acp, old)) == list(cm_timesteps(acp, 2, "karras"))  # fixed N


def test_distillation_defaults_keep_the_uniform_sampler_and_fixed_grid(tmp_path):
    """cm_distill's defaults: no curriculum, uniform pairs: the loop's own UniformSampler draws
    n over the fixed N - 1 pairs with weights 1, as before iCT."""
    assert (cm_defaults()["cm_curriculum"], cm_defaults()["cm_noise_dist"],
            cm_defaults()["cm_weighting"], cm_defaults()["cm_steps"]) == (
        "none", "uniform", "uniform", 18)
    teacher = create_model(16, 32, 1, channel_mult="1,2", attention_resolutions="8")
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    try:
        loop = CMTrainLoop(
            model=copy.deepcopy(teacher), diffusion=create_gaussian_diffusion(steps=40),
            teacher=teacher.eval(), cm=ConsistencyConfig(cm_steps=6), data=iter([]),
            batch_size=2, microbatch=-1, lr=1e-3, ema_rate="0.9", log_interval=1,
            save_interval=100, resume_checkpoint="")
    finally:
        logger.reset()
    assert type(loop.schedule_sampler) is UniformSampler
    assert loop.diffusion.pair_sampler() is None
    assert loop.diffusion.num_timesteps == 5 and len(loop.schedule_sampler.weights()) == 5


def test_cm_distill_ct_curriculum_script_then_two_step_sampling(tmp_path):
    """cm_distill.py --training_mode consistency_training with the curriculum (N 3 -> 5 over 4
    steps), then image_sample.py --sampler consistency --steps 2 on the student's last grid; the
    curriculum without --lr_anneal_steps is refused in one line naming the flags."""
    from test_scripts import UNET, load_npz, run, write_digits

    write_digits(str(tmp_path / "digits"), image_size=16, val_every=6)
    ct = [*UNET, "--training_mode", "consistency_training", "--data_dir",
          str(tmp_path / "digits" / "train"), "--batch_size", "2", "--cm_steps", "2",
          "--cm_steps_max", "4", "--cm_curriculum", "ict", "--cm_noise_dist", "lognormal",
          "--cm_weighting", "inverse_step", "--random_flip", "False", "--seed", "0",
          "--log_interval", "1"]
    proc = run("cm_distill.py", *ct, "--output_dir", str(tmp_path / "bad"), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "--lr_anneal_steps" in lines[0], lines
    assert "--cm_curriculum" in lines[0]
    run("cm_distill.py", *ct, "--lr_anneal_steps", "4", "--output_dir", str(tmp_path / "ct"))
    files = set(os.listdir(tmp_path / "ct"))
    assert {"model000004.pt", "target000004.pt", "opt000004.pt", "args.json"} <= files
    with open(tmp_path / "ct" / "progress.csv") as f:
        assert [int(float(r["cm_scales"])) for r in csv.DictReader(f)] == [3, 3, 5, 5]
    with open(tmp_path / "ct" / "args.json") as f:
        assert json.load(f)["cm_curriculum"] == "ict"
    run("image_sample.py", *UNET, "--progress", "False", "--num_samples", "2", "--batch_size",
        "2", "--seed", "1", "--sampler", "consistency", "--steps", "2", "--model_path",
        str(tmp_path / "ct" / "model000004.pt"), "--output_dir", str(tmp_path / "s"))
    assert load_npz(tmp_path / "s" / "samples_2x16x16x3.npz")["arr_0"].shape == (2, 16, 16, 3)
