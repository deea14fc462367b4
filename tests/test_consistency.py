"""Consistency distillation on data whose exact denoiser and consistency function are known.

For data x_0 ~ N(mu, s^2 I) the marginal at grid index t is N(alpha mu, (alpha^2 s^2 + sigma^2) I)
(alpha^2 = alphas_cumprod[t], sigma^2 = 1 - alpha^2), the exact denoiser is
    E[x_0 | x_t] = mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2),
and the probability-flow ODE keeps z = (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) fixed, so
the exact consistency function (the ODE's map to t_min, in x / alpha) is affine:
    f*(x_t, t) = mu + sqrt(s^2 + sigma~_min^2) z,   sigma~ = sigma / alpha.
"""

import copy
import math
import os

import numpy as np
import pytest
import torch as th
import torch.nn as nn

from guided_diffusion import logger, samplers, sample_util
from guided_diffusion.checkpoints import CheckpointError, check_sampler_fits_model
from guided_diffusion.config import ConsistencyConfig
from guided_diffusion.cm_train import CMTrainLoop
from guided_diffusion.consistency import (
    ConsistencyDistillation,
    ConsistencyFunction,
    cm_defaults,
    cm_timesteps,
    consistency_sample,
    pseudo_huber,
    sample_timesteps,
    update_target,
)
from guided_diffusion.samplers import STEPS, Denoiser, solve
from guided_diffusion.script_util import create_gaussian_diffusion, create_model

MU, S = 0.3, 0.5


def gen(seed):
    return th.Generator().manual_seed(seed)


class GaussianTeacher(nn.Module):
    """The exact eps- or x_0-predictor of N(MU, S^2) data, called with the grid's timesteps."""

    def __init__(self, alphas_cumprod, output="eps"):
        super().__init__()
        self.register_buffer("acp", th.tensor(np.asarray(alphas_cumprod), dtype=th.float32))
        self.output = output

    def forward(self, x, t, y=None):
        a = self.acp[t.long()].view(-1, *[1] * (x.dim() - 1))
        var = a * S**2 + 1 - a
        if self.output == "x0":
            return MU + a.sqrt() * S**2 * (x - a.sqrt() * MU) / var
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / var


def exact_cf(x, a, a_min):
    """f*(x_t, t) above, for alpha^2 = a and alpha_min^2 = a_min (tensors or floats)."""
    z = (x - a**0.5 * MU) / (a * S**2 + 1 - a) ** 0.5
    return MU + (S**2 + (1 - a_min) / a_min) ** 0.5 * z


class ExactCFNet(nn.Module):
    """
    An eps-network whose consistency function is f*: it outputs the eps that makes
    c_skip x~ + (1 - c_skip) D equal to f*, with c_skip = sigma~_min / sigma~ written here
    independently of the code under test (the teacher's exact eps at t_min, where c_out = 0).
    """

    def __init__(self, alphas_cumprod, t_min=0):
        super().__init__()
        self.acp = th.tensor(np.asarray(alphas_cumprod), dtype=th.float64)
        self.t_min = t_min
        self.teacher = GaussianTeacher(alphas_cumprod)

    def forward(self, x, t, y=None):
        x = x.double()
        a = self.acp[t.long()].view(-1, *[1] * (x.dim() - 1))
        a_min = self.acp[self.t_min]
        sig, sig_min = ((1 - a) / a).sqrt(), ((1 - a_min) / a_min).sqrt()
        c_skip = sig_min / sig
        at_min = (t.long() == self.t_min).view_as(c_skip)
        c_out = th.where(at_min, th.ones_like(c_skip), 1 - c_skip)
        d = (exact_cf(x, a, a_min) - c_skip * x / a.sqrt()) / c_out
        eps = (x - a.sqrt() * d) / (1 - a).sqrt()
        eps = th.where(at_min, self.teacher(x, t).double(), eps)
        return eps.float()


class RandomNet(nn.Module):
    """An arbitrary network of the teacher's format: large, input-dependent outputs."""

    def __init__(self, channels, out_channels):
        super().__init__()
        self.proj = nn.Conv2d(channels + 1, out_channels, 1)
        nn.init.normal_(self.proj.weight, std=30.0)

    def forward(self, x, t, y=None):
        tt = t.float().view(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.proj(th.cat([x, tt / 10], dim=1))


class PerStepAffine(nn.Module):
    """A student x_0 model D(x, t) = a[t] x + b[t], started from the exact teacher's values."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        acp = th.tensor(np.asarray(alphas_cumprod), dtype=th.float32)
        var = acp * S**2 + 1 - acp
        self.a = nn.Parameter(acp.sqrt() * S**2 / var)
        self.b = nn.Parameter(MU - acp * S**2 * MU / var)

    def forward(self, x, t, y=None):
        shape = (-1, *[1] * (x.dim() - 1))
        return self.a[t.long()].view(shape) * x + self.b[t.long()].view(shape)


class Counting(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(predict_xstart=True), dict(learn_sigma=True),
     dict(noise_schedule="cosine", timestep_respacing="10")],
    ids=["eps", "x0", "learned-sigma", "cosine-respaced"],
)
@pytest.mark.parametrize("t_min", [0, 3])
def test_boundary_condition_holds_bit_for_bit(options, t_min):
    """f(x, t_min) == x / alpha_{t_min} exactly (the float64 quotient, rounded once), whatever
    (finite) the network outputs."""
    diffusion = create_gaussian_diffusion(steps=40, **options)
    out_channels = 6 if options.get("learn_sigma") else 3
    fn = ConsistencyFunction(diffusion, RandomNet(3, out_channels), t_min=t_min)
    x = th.randn(4, 3, 8, 8, generator=gen(0))
    alpha_min = math.sqrt(diffusion.alphas_cumprod[t_min])
    alpha_min = th.tensor(alpha_min, dtype=th.float64)
    with th.no_grad():
        assert th.equal(fn(x, t_min), (x.double() / alpha_min).float())
        per_sample = th.tensor([t_min, 5, t_min, 7])
        f = fn(x, per_sample)
        assert th.equal(f[[0, 2]], (x[[0, 2]].double() / alpha_min).float())
        # Away from t_min the network matters (it outputs values of order 100 here).
        assert (f[1] - x[1] / diffusion.sqrt_alphas_cumprod[5]).abs().max() > 1.0


def test_fresh_student_is_one_ddim_step_of_the_teacher_to_t_min():
    """c_out = 1 - c_skip, c_skip = sigma~_min / sigma~: f = DDIM from t to t_min, over alpha."""
    diffusion = create_gaussian_diffusion(steps=50)
    net = RandomNet(3, 3)
    x = th.randn(2, 3, 4, 4, generator=gen(1))
    fn = ConsistencyFunction(diffusion, net, t_min=2)
    den = Denoiser(diffusion, net, clip_denoised=False)
    with th.no_grad():
        for t in (3, 20, 49):
            ddim = STEPS["ddim"](den, x, t, 2, [den(x, t)])
            expected = ddim / math.sqrt(diffusion.alphas_cumprod[2])
            assert th.allclose(fn(x, t), expected, rtol=1e-5, atol=1e-4 * expected.abs().max())


def test_pseudo_huber_matches_its_formula_and_limits():
    a = th.randn(5, 3, 4, 4, generator=gen(2), dtype=th.float64)
    b = th.randn(5, 3, 4, 4, generator=gen(3), dtype=th.float64)
    c = 0.00054 * math.sqrt(48)
    sq = ((a - b) ** 2).sum(dim=(1, 2, 3))
    assert th.allclose(pseudo_huber(a, b), (sq + c * c).sqrt() - c, rtol=1e-12)
    assert th.allclose(pseudo_huber(a, b, c=0.7), (sq + 0.49).sqrt() - 0.7, rtol=1e-12)
    # Small differences: ~ |d|^2 / (2c) (quadratic); large: ~ |d| (linear), both to 1e-6.
    d = th.tensor([1e-6, 1e3], dtype=th.float64).view(2, 1)
    zero = th.zeros_like(d)
    small, large = pseudo_huber(d, zero, c=1.0)
    assert small == pytest.approx(1e-12 / 2, rel=1e-6)
    assert large == pytest.approx(1e3, rel=1e-3) and large - 1e3 == pytest.approx(-1.0, rel=1e-3)
    assert pseudo_huber(d[:1], zero[:1], c=1e-9) == pytest.approx(1e-6, rel=1e-3)


def test_cm_timesteps_and_sample_timesteps():
    acp = create_gaussian_diffusion(steps=100).alphas_cumprod
    ts = cm_timesteps(acp, 8)
    assert len(ts) == 8 and ts[0] == 0 and ts[-1] == 99 and np.all(np.diff(ts) > 0)
    assert list(cm_timesteps(acp, 5, "uniform")) == [0, 25, 50, 74, 99]
    assert list(sample_timesteps(acp, 1)) == [99]
    two = sample_timesteps(acp, 2)
    assert two[0] == 99 and 0 < two[1] < 99
    with pytest.raises(ValueError, match="--cm_steps"):
        cm_timesteps(acp, 1)


def cd_loss(diffusion, student, solver, num_scales, batch=512, seed=4):
    teacher = GaussianTeacher(diffusion.alphas_cumprod)
    cd = ConsistencyDistillation(diffusion, teacher, copy.deepcopy(student), num_scales=num_scales,
                                 solver=solver, distance="l2")
    x0 = MU + S * th.randn(batch, 2, 1, 1, generator=gen(seed))
    n = th.arange(batch) % cd.num_timesteps  # every pair equally often
    z = th.randn(batch, 2, 1, 1, generator=gen(seed + 1))
    return cd.training_losses(student, x0, n, noise=z)["loss"].mean().item()


@pytest.mark.parametrize("solver, order", [("heun", 2), ("ddim", 1)])
def test_exact_consistency_function_has_zero_cd_loss_up_to_solver_error(solver, order):
    """
    CD loss of f* = squared local error of one teacher step, O(h^(2 order + 2)): it falls by
    ~2^(2 order + 2) when the discretisation is refined twice (measured: Heun 64, 62; DDIM 14, 25).
    Any other smooth function has an O(h^2) loss, falling by ~4 (the fresh student: ~4).
    """
    diffusion = create_gaussian_diffusion(steps=100)
    acp = diffusion.alphas_cumprod
    exact = [cd_loss(diffusion, ExactCFNet(acp), solver, n + 1) for n in (12, 24, 48)]
    fresh = [cd_loss(diffusion, GaussianTeacher(acp), solver, n + 1) for n in (12, 24, 48)]
    exact_ratios = [a / b for a, b in zip(exact, exact[1:])]
    fresh_ratios = [a / b for a, b in zip(fresh, fresh[1:])]
    assert min(exact_ratios) > 2 ** (2 * order + 2) / 2, (exact, exact_ratios)
    assert max(fresh_ratios) < 6, (fresh, fresh_ratios)
    assert exact[-1] < 10.0 ** -(order + 1) * fresh[-1], (exact, fresh)


def test_consistency_training_pairs_share_x0_and_noise():
    """teacher=None: x^_n = alpha_n x_0 + sigma_n z with the z of x_{n+1} (Algorithm 3)."""
    diffusion = create_gaussian_diffusion(steps=100)
    student = PerStepAffine(diffusion.alphas_cumprod)
    cd = ConsistencyDistillation(diffusion, None, copy.deepcopy(student), num_scales=6,
                                 distance="l2")
    x0 = th.randn(6, 2, 1, 1, generator=gen(5))
    z = th.randn(6, 2, 1, 1, generator=gen(6))
    n = th.tensor([0, 1, 2, 3, 4, 0])
    loss = cd.training_losses(student, x0, n, noise=z)["loss"]
    fn = ConsistencyFunction(diffusion, student)
    ts = th.tensor(cd.timesteps)
    acp = th.tensor(diffusion.alphas_cumprod, dtype=th.float32)[:, None, None, None]
    with th.no_grad():
        hi, lo = ts[n + 1], ts[n]
        a = fn(acp[hi].sqrt() * x0 + (1 - acp[hi]).sqrt() * z, hi)
        b = fn(acp[lo].sqrt() * x0 + (1 - acp[lo]).sqrt() * z, lo)
    assert th.allclose(loss, ((a - b) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-8)


def test_distilled_student_samples_the_data_in_one_step():
    """
    CD of the exact x_0 teacher into a per-step affine x_0 student (started from the teacher)
    on N = 16 points, 200 Adam steps: one-step samples from N(0, I) match the teacher's 16-point
    Heun solve (CD's fixed point; measured 0.308 / 0.525 for both) within 0.01, and the data's
    mean and std (0.3 / 0.5) within 0.03; the untrained student (one DDIM step of the teacher)
    has std 0.03.
    """
    th.manual_seed(0)
    diffusion = create_gaussian_diffusion(steps=100, predict_xstart=True)
    acp = diffusion.alphas_cumprod
    teacher = GaussianTeacher(acp, output="x0")
    student = PerStepAffine(acp)
    target = copy.deepcopy(student)
    cd = ConsistencyDistillation(diffusion, teacher, target, num_scales=16, solver="heun")
    opt = th.optim.Adam(student.parameters(), lr=0.02)
    shape = (4096, 2, 1, 1)
    x_T = th.randn(*shape, generator=gen(7))

    def one_step_moments():
        fn = ConsistencyFunction(diffusion, student, t_min=cd.t_min)
        x = consistency_sample(fn, shape, sample_timesteps(acp, 1), noise=x_T,
                               clip_denoised=False)
        return x.mean().item(), x.std().item()

    den = Denoiser(diffusion, teacher, clip_denoised=False)
    heun = solve("heun", den, x_T, cd.timesteps[::-1].tolist()) / math.sqrt(acp[0])
    mean0, std0 = one_step_moments()
    assert std0 < 0.1, std0
    for _ in range(200):
        x0 = MU + S * th.randn(256, 2, 1, 1)
        n = th.randint(0, cd.num_timesteps, (256,))
        loss = cd.training_losses(student, x0, n)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_target(target, student, mu=0.9)
    mean, std = one_step_moments()
    report = (mean0, std0, mean, std, heun.mean().item(), heun.std().item())
    assert abs(mean - heun.mean()) < 0.01 and abs(std - heun.std()) < 0.01, report
    assert abs(mean - MU) < 0.03 and abs(std - S) < 0.03, report


@pytest.mark.parametrize("k", [1, 2, 4])
def test_few_step_sampling_makes_exactly_k_network_evaluations(k):
    diffusion = create_gaussian_diffusion(steps=100)
    net = Counting(GaussianTeacher(diffusion.alphas_cumprod))
    fn = ConsistencyFunction(diffusion, net)
    x = consistency_sample(fn, (3, 2, 1, 1), sample_timesteps(diffusion.alphas_cumprod, k),
                           noise=th.randn(3, 2, 1, 1, generator=gen(8)))
    assert net.calls == k and fn.nfe == k and x.shape == (3, 2, 1, 1)
    with pytest.raises(ValueError, match="t_min"):
        consistency_sample(fn, (3, 2, 1, 1), [50, 0])


def test_update_target_is_the_ema_and_bad_input_is_named():
    student, target = nn.Linear(2, 2), nn.Linear(2, 2)
    expected = [0.9 * p + 0.1 * q for p, q in zip(target.parameters(), student.parameters())]
    update_target(target, student, mu=0.9)
    assert all(th.allclose(p, e) for p, e in zip(target.parameters(), expected))
    update_target(target, student, mu=0.0)
    assert all(th.equal(p, q) for p, q in zip(target.parameters(), student.parameters()))
    with pytest.raises(ValueError, match="--target_ema"):
        update_target(target, student, mu=1.5)
    diffusion = create_gaussian_diffusion(steps=40)
    with pytest.raises(ValueError, match="--teacher_solver"):
        ConsistencyDistillation(diffusion, None, target, num_scales=4, solver="euler")
    with pytest.raises(ValueError, match="not an ODE step"):
        ConsistencyDistillation(diffusion, None, target, num_scales=4, solver="dpm++2m-sde")
    cd = ConsistencyDistillation(diffusion, None, target, num_scales=4)
    with pytest.raises(ValueError, match="pair indices"):
        cd.training_losses(student, th.zeros(2, 2), th.tensor([0, 3]))
    with pytest.raises(ValueError, match="--cm_steps 41"):
        ConsistencyDistillation(diffusion, None, target, num_scales=41)
    with pytest.raises(ValueError, match="--cm_spacing"):
        ConsistencyDistillation.from_options(diffusion, None, target, cm_spacing="edm")
    with pytest.raises(TypeError, match="known"):
        ConsistencyDistillation.from_options(diffusion, None, target, cm_step=4)
    assert cm_defaults()["cm_steps"] == 18 and cm_defaults()["target_ema"] == 0.95
    cd = ConsistencyDistillation.from_options(diffusion, None, target, cm_steps=4)
    assert cd.num_timesteps == 3 and cd.huber_c is None


class RecordingNet(nn.Module):
    """An x_0 network that records the random number it draws (as dropout would) per call."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(th.ones(()))
        self.draws = []

    def forward(self, x, t, y=None):
        r = th.rand(())
        self.draws.append(r.item())
        return self.scale * x * r


def test_target_draws_the_students_dropout_randomness():
    diffusion = create_gaussian_diffusion(steps=40, predict_xstart=True)
    student, target = RecordingNet(), RecordingNet()
    cd = ConsistencyDistillation(diffusion, None, target, num_scales=5)
    x0 = th.randn(4, 2, 1, 1, generator=gen(9))
    for _ in range(3):
        cd.training_losses(student.train(), x0, th.tensor([0, 1, 2, 3]))
    assert student.draws == target.draws and len(set(student.draws)) == 3
    assert target.training


def test_distilling_a_tiny_cfg_unet_end_to_end():
    """A class-conditional learned-sigma U-Net distilled at guidance weight 3 for two steps."""
    th.manual_seed(0)
    diffusion = create_gaussian_diffusion(steps=40, learn_sigma=True)
    teacher = create_model(16, 32, 1, channel_mult="1,2", learn_sigma=True, class_cond=True,
                           attention_resolutions="8", num_classes=3, class_dropout_prob=0.1,
                           dropout=0.1)
    student = copy.deepcopy(teacher).train()
    # A guided student must always see its label: no label dropout (its null row stays unused).
    student.class_dropout_prob = 0.0
    target = copy.deepcopy(student)
    teacher_before = copy.deepcopy(teacher.state_dict())
    cd = ConsistencyDistillation(diffusion, teacher, target, num_scales=6, solver="heun",
                                 cfg_scale=3.0, weighting="inverse_step")
    opt = th.optim.Adam(student.parameters(), lr=1e-3)
    x0 = th.rand(4, 3, 16, 16) * 2 - 1
    kwargs = {"y": th.tensor([0, 1, 2, 0])}
    for _ in range(2):
        losses = cd.training_losses(student, x0, th.tensor([0, 2, 4, 2]), model_kwargs=kwargs)
        assert losses["loss"].shape == (4,) and th.isfinite(losses["loss"]).all()
        opt.zero_grad()
        losses["loss"].mean().backward()
        opt.step()
        update_target(target, student, mu=0.95)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(th.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not th.equal(target.out[-1].weight, teacher.out[-1].weight)
    fn = ConsistencyFunction(diffusion, student.eval())
    x = consistency_sample(fn, (4, 3, 16, 16), sample_timesteps(diffusion.alphas_cumprod, 2),
                           model_kwargs=kwargs)
    assert x.shape == (4, 3, 16, 16) and x.abs().max() <= 1 and fn.nfe == 2


def test_classifier_guidance_shifts_the_denoiser_by_the_scaled_gradient():
    """
    Score-form guidance (eps' = eps - sigma g) moves D by sigma^2 / alpha g, so f moves by
    (1 - c_skip) sigma^2 / alpha g with c_skip = sigma~_min / sigma~; nothing at t_min.
    """
    diffusion = create_gaussian_diffusion(steps=50)
    acp = diffusion.alphas_cumprod
    fn = ConsistencyFunction(diffusion, GaussianTeacher(acp))
    x = th.randn(2, 3, 4, 4, generator=gen(10))
    g = th.randn(2, 3, 4, 4, generator=gen(11))
    with th.no_grad():
        for t in (0, 10, 30):
            a = acp[t]
            c_skip = math.sqrt((1 - acp[0]) / acp[0]) / math.sqrt((1 - a) / a)
            shift = (1 - c_skip) * (1 - a) / math.sqrt(a) * g
            guided = fn(x, t, cond_fn=lambda x_, t_, **kw: g)
            assert th.allclose(guided - fn(x, t), shift, atol=1e-5), t


# ------------------------------------------------------------------------------------------------
# Integration: the training loop, the sampler, the scripts


def make_cm_loop(log_dir, data, steps, resume=""):
    """A CFG-distillation loop on a tiny class-conditional U-Net with dropout (x_0 output)."""
    logger.configure(dir=str(log_dir), format_strs=["csv"])
    th.manual_seed(0)
    np.random.seed(0)
    teacher = create_model(16, 32, 1, channel_mult="1,2", class_cond=True, num_classes=3,
                           attention_resolutions="8", class_dropout_prob=0.1, dropout=0.1)
    diffusion = create_gaussian_diffusion(steps=40, predict_xstart=True, noise_schedule="cosine")
    cm = ConsistencyConfig(cm_steps=6, teacher_solver="heun", target_ema=0.9,
                           teacher_cfg_scale=2.0)
    return CMTrainLoop(
        model=copy.deepcopy(teacher), diffusion=diffusion, teacher=teacher.eval(), cm=cm,
        data=iter(data), batch_size=4, microbatch=2, lr=1e-3, ema_rate="0.9", log_interval=1,
        save_interval=100, resume_checkpoint=resume, lr_anneal_steps=steps,
    )


def cm_batches(n, seed=0):
    g = gen(seed)
    return [(th.rand(4, 3, 16, 16, generator=g) * 2 - 1,
             {"y": th.randint(0, 3, (4,), generator=g)}) for _ in range(n)]


def test_cm_resume_restores_student_target_and_optimizer_bit_for_bit(tmp_path, monkeypatch):
    """
    Stop after 2 of 4 steps, resume with `auto`, and end with exactly the weights, target, EMA
    and AdamW moments of an uninterrupted run: the noise, pair indices and dropout masks of steps
    3-4 come from the RNG states saved in opt*.pt (the batches continue by construction here).
    """
    saved = th.get_num_threads()
    th.set_num_threads(1)
    try:
        data = cm_batches(4)
        whole = make_cm_loop(tmp_path / "whole", data, steps=4)
        whole.run_loop()
        monkeypatch.setenv("DIFFUSION_TRAINING_TEST", "1")  # stop after the first save
        first = make_cm_loop(tmp_path / "split", data, steps=4)
        first.save_interval = 2
        first.run_loop()
        monkeypatch.delenv("DIFFUSION_TRAINING_TEST")
        assert first.step == 2 and (tmp_path / "split" / "target000002.pt").exists()
        second = make_cm_loop(tmp_path / "split", data[2:], steps=4, resume="auto")
        assert second.resume_step == 2
        second.run_loop()
    finally:
        th.set_num_threads(saved)
        logger.reset()
    assert not th.equal(whole.target.out[-1].weight, first.target.out[-1].weight)  # it moved
    for name, a, b in [("student", whole.model, second.model),
                       ("target", whole.target, second.target)]:
        for (key, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert th.equal(p, q), (name, key)
    for p, q in zip(whole.ema_params[0], second.ema_params[0]):
        assert th.equal(p, q)
    opt_a, opt_b = whole.opt.state_dict()["state"], second.opt.state_dict()["state"]
    for i in opt_a:
        for key in ("exp_avg", "exp_avg_sq"):
            assert th.equal(opt_a[i][key], opt_b[i][key]), (i, key)
    # The files hold the same: the target as a plain float32 state_dict beside model/opt/ema.
    target_file = th.load(tmp_path / "split" / "target000004.pt", weights_only=True)
    assert all(th.equal(v, whole.target.state_dict()[k]) for k, v in target_file.items())
    assert second.model.class_dropout_prob == 0.0  # the student always sees its label
    resume = th.load(tmp_path / "split" / "opt000004.pt", weights_only=True)["resume"]
    assert resume["train_flags"]["cm_steps"] == 6 and resume["step"] == 4


def test_cm_resume_without_the_target_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_TRAINING_TEST", "1")
    data = cm_batches(1)
    loop = make_cm_loop(tmp_path, data, steps=1)
    loop.run_loop()
    os.remove(tmp_path / "target000001.pt")
    with pytest.raises(CheckpointError, match="target000001.pt"):
        make_cm_loop(tmp_path, data, steps=2, resume="auto")
    logger.reset()


class CountingX0(nn.Module):
    """The Gaussian x_0 teacher, recording the grid timestep of every call."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.net = GaussianTeacher(alphas_cumprod, output="x0")
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append(int(t[0]))
        return self.net(x, t)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampler_costs_exactly_k_evaluations(steps):
    diffusion = create_gaussian_diffusion(steps=100, predict_xstart=True)
    model = CountingX0(diffusion.alphas_cumprod)
    shape = (3, 2, 4, 4)
    x = samplers.sample(diffusion, model, shape, noise=th.randn(shape, generator=gen(1)),
                        sampler="consistency", steps=steps)
    assert x.shape == shape and th.isfinite(x).all()
    assert len(model.calls) == steps == samplers.nfe("consistency", steps)
    assert model.calls == sample_timesteps(diffusion.alphas_cumprod, steps).tolist()
    with pytest.raises(ValueError, match="--eta"):
        samplers.sample(diffusion, model, shape, sampler="consistency", steps=1, eta=0.5)


def test_consistency_sampler_is_seeded_per_sample_and_guided_by_a_classifier():
    """Per-sample noise: the same samples in one batch of 4 as in two of 2; a cond_fn is
    evaluated once per step and moves the samples."""
    diffusion = create_gaussian_diffusion(steps=100, predict_xstart=True)
    model = GaussianTeacher(diffusion.alphas_cumprod, output="x0")
    gens = lambda idx: sample_util.PerSampleNoise(sample_util.sample_generators(3, idx))  # noqa

    def run(indices, cond_fn=None):
        src = gens(indices)
        shape = (len(indices), 2, 4, 4)
        return samplers.sample(diffusion, model, shape, noise=src.randn(shape), noise_fn=src,
                               cond_fn=cond_fn, sampler="consistency", steps=3)

    whole = run([0, 1, 2, 3])
    assert th.equal(whole, th.cat([run([0, 1]), run([2, 3])]))
    calls = []

    def cond_fn(x, t, **kwargs):
        calls.append(int(t[0]))
        return th.ones_like(x)

    assert not th.allclose(run([0, 1, 2, 3], cond_fn), whole, atol=1e-3)
    assert len(calls) == 3


def test_the_sampler_must_fit_the_model_kind(tmp_path):
    (tmp_path / "cm").mkdir()
    (tmp_path / "cm" / "args.json").write_text('{"training_mode": "consistency_distillation"}')
    (tmp_path / "dm").mkdir()
    (tmp_path / "dm" / "args.json").write_text('{"lr": 0.001}')
    cm_path, dm_path = str(tmp_path / "cm" / "model000002.pt"), str(tmp_path / "dm" / "m.pt")
    check_sampler_fits_model("consistency", cm_path)
    check_sampler_fits_model("ddpm", dm_path)
    check_sampler_fits_model("", str(tmp_path / "released.pt"))  # no args.json: diffusion
    with pytest.raises(ValueError, match="--sampler consistency needs a consistency model"):
        check_sampler_fits_model("consistency", dm_path)
    with pytest.raises(ValueError, match="is a consistency model"):
        check_sampler_fits_model("dpm++2m", cm_path)
    check_sampler_fits_model("consistency", dm_path, consistency_model="yes")  # forced
    check_sampler_fits_model("ddim", cm_path, consistency_model="no")
    with pytest.raises(ValueError, match="--consistency_model"):
        check_sampler_fits_model("ddim", cm_path, consistency_model="maybe")


def test_cm_distill_script_end_to_end_then_image_sample_two_steps(tmp_path):
    """cm_distill.py for 2 steps from a released-style teacher file (no args.json), resumed with
    --resume_checkpoint auto to 3; then image_sample.py --sampler consistency --steps 2 on the
    student."""
    from test_scripts import UNET, load_npz, run, write_digits

    write_digits(str(tmp_path / "digits"), image_size=16, val_every=6)
    th.manual_seed(0)
    flags = dict(zip(UNET[::2], UNET[1::2]))
    teacher = create_model(16, 32, 1, channel_mult="1,2", class_cond=True, num_classes=10,
                           attention_resolutions="8", num_head_channels=32,
                           use_scale_shift_norm=True)
    (tmp_path / "teacher").mkdir()
    teacher_path = tmp_path / "teacher" / "model.pt"  # a released-style file, no args.json
    th.save(teacher.state_dict(), teacher_path)
    assert flags["--diffusion_steps"] == "100"
    distil = [*UNET, "--teacher_path", str(teacher_path), "--data_dir",
              str(tmp_path / "digits" / "train"), "--batch_size", "2", "--cm_steps", "5",
              "--teacher_solver", "dpm++2m", "--cm_loss", "l2", "--random_flip", "False",
              "--save_interval", "2", "--seed", "0", "--output_dir", str(tmp_path / "cm")]
    # One process here (the test suite's time); two ranks go through the same TrainLoop/DDP
    # path that test_scripts.py launches with torchrun.
    run("cm_distill.py", *distil, "--lr_anneal_steps", "2")
    run("cm_distill.py", *distil, "--lr_anneal_steps", "3", "--resume_checkpoint", "auto")
    files = set(os.listdir(tmp_path / "cm"))
    assert {"model000002.pt", "target000002.pt", "opt000002.pt", "ema_0.9999_000002.pt",
            "model000003.pt", "target000003.pt", "args.json"} <= files
    student = str(tmp_path / "cm" / "model000003.pt")
    sample = [*UNET, "--progress", "False", "--num_samples", "3", "--batch_size", "2",
              "--seed", "1", "--sampler", "consistency", "--steps", "2"]
    run("image_sample.py", *sample, "--model_path", student, "--output_dir", str(tmp_path / "s"))
    out = load_npz(tmp_path / "s" / "samples_3x16x16x3.npz")
    assert out["arr_0"].shape == (3, 16, 16, 3) and out["arr_1"].shape == (3,)
    # A diffusion sampler on the student is refused in one line (the other way round, and the
    # forcing flag: test_the_sampler_must_fit_the_model_kind).
    args = [a if a != "consistency" else "ddpm" for a in sample]
    proc = run("image_sample.py", *args, "--model_path", student, "--output_dir",
               str(tmp_path / "bad"), check=False)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error:"), proc.stderr
    assert "--consistency_model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("solver", ["ddim", "dpm++2m", "plms", "dpm++3m"])
def test_batched_teacher_step_equals_the_solvers_own_step_per_sample(solver):
    """The one-pass DDIM-family teacher step of a batch with mixed pair indices equals each
    sample's step by the sampler's own step function (one int timestep per call)."""
    diffusion = create_gaussian_diffusion(steps=100, noise_schedule="cosine")
    teacher = GaussianTeacher(diffusion.alphas_cumprod)
    cd = ConsistencyDistillation(diffusion, teacher, nn.Identity(), num_scales=8, solver=solver)
    x0, noise = th.randn(6, 2, 3, 3, generator=gen(5)), th.randn(6, 2, 3, 3, generator=gen(6))
    n = th.tensor([0, 3, 6, 3, 1, 5])
    x_next, x_hat = cd._pair(x0, n, noise, {})
    for i, k in enumerate(n.tolist()):
        den = Denoiser(diffusion, teacher, clip_denoised=False)
        t, t_to = int(cd.timesteps[k + 1]), int(cd.timesteps[k])
        x = x_next[i:i + 1]
        ref = STEPS[solver](den, x, t, t_to, [den(x, t)])
        assert th.allclose(x_hat[i:i + 1], ref, atol=1e-5, rtol=1e-5), (i, k)
