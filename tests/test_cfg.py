"""Classifier-free guidance: exact at w = 0 / 1, linear in w, one batched forward, every sampler."""

import math

import numpy as np
import pytest
import torch as th
from conftest import crc32_init_

from guided_diffusion import samplers
from guided_diffusion.guidance import ClassifierFreeGuidance, cfg_model, classifier_cond_fn
from guided_diffusion.samplers import Denoiser, sample
from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion, create_model

NUM_CLASSES = 3
CLASS_MEANS = th.tensor([-0.5, 0.1, 0.6, 0.0], dtype=th.float64)  # last row: the null label
S = 0.4


# Tiny models run fastest on one thread of a busy CPU (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


class GaussianClassModel(th.nn.Module):
    """
    Exact eps-predictor of class-conditional data N(mean_y, s^2 I), with the null label NUM_CLASSES
    giving N(0, s^2 I). Counts its forward calls and batch sizes.
    """

    def __init__(self, alphas_cumprod, learn_sigma=False):
        super().__init__()
        self.acp = th.tensor(np.asarray(alphas_cumprod), dtype=th.float64)
        self.num_classes, self.class_dropout_prob = NUM_CLASSES, 0.1
        self.learn_sigma = learn_sigma
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append(x.shape[0])
        a = self.acp[t.long()].view(-1, *[1] * (x.dim() - 1))
        mu = CLASS_MEANS[y].view(-1, *[1] * (x.dim() - 1))
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * S**2 + 1 - a)
        if self.learn_sigma:  # variance channels that differ per class, to see which is kept
            return th.cat([eps, th.ones_like(eps) * mu], dim=1)
        return eps


def noise(shape, seed=0):
    return th.randn(*shape, generator=th.Generator().manual_seed(seed), dtype=th.float64)


def tiny_unet(learn_sigma=True):
    th.manual_seed(0)
    model = create_model(16, 32, 1, channel_mult="1,2", learn_sigma=learn_sigma, class_cond=True,
                         attention_resolutions="8", num_classes=NUM_CLASSES, class_dropout_prob=0.1)
    return crc32_init_(model)  # zero-initialised output layers would make every branch equal


def test_cfg_is_exact_at_w0_and_w1_and_linear_in_w():
    diffusion = create_gaussian_diffusion(steps=1000)
    model = GaussianClassModel(diffusion.alphas_cumprod, learn_sigma=True)
    x, t = noise((6, 2, 1, 1)), th.tensor([999, 500, 10, 0, 250, 750])
    y = th.tensor([0, 1, 2, 0, 1, 2])
    null = th.full_like(y, NUM_CLASSES)
    cond, uncond = model(x, t, y), model(x, t, null)
    assert th.equal(ClassifierFreeGuidance(model, 1.0, NUM_CLASSES)(x, t, y=y), cond)
    w0 = ClassifierFreeGuidance(model, 0.0, NUM_CLASSES)(x, t, y=y)
    assert th.equal(w0[:, :2], uncond[:, :2]) and th.equal(w0[:, 2:], cond[:, 2:])
    model.calls.clear()
    eps_model = GaussianClassModel(diffusion.alphas_cumprod)
    assert th.equal(ClassifierFreeGuidance(eps_model, 0.0, NUM_CLASSES)(x, t, y=y), uncond[:, :2])
    assert eps_model.calls == [6]  # w = 0 without variance channels: the null branch only
    w3 = ClassifierFreeGuidance(model, 3.0, NUM_CLASSES)(x, t, y=y)
    assert model.calls == [12]  # conditional and unconditional in one batched forward
    assert th.allclose(w3[:, :2], uncond[:, :2] + 3.0 * (cond[:, :2] - uncond[:, :2]), atol=1e-12)
    assert th.equal(w3[:, 2:], cond[:, 2:])  # learned-sigma channels: the conditional branch's


def test_cfg_on_the_unet_matches_separate_forwards():
    model = tiny_unet(learn_sigma=True)
    x, t = th.randn(4, 3, 16, 16), th.tensor([10, 200, 500, 900])
    y = th.tensor([0, 1, 2, 1])
    with th.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, th.full_like(y, NUM_CLASSES))
        w1 = cfg_model(model, 1.0)(x, t, y=y)
        w0 = cfg_model(model, 0.0)(x, t, y=y)
        w4 = cfg_model(model, 4.0)(x, t, y=y)
    assert not th.allclose(cond[:, :3], uncond[:, :3], atol=1e-3)  # the label matters
    assert th.equal(w1, cond)
    assert th.allclose(w0[:, :3], uncond[:, :3], atol=1e-5)
    assert th.allclose(w0[:, 3:], cond[:, 3:], atol=1e-5)
    assert th.allclose(w4[:, :3], uncond[:, :3] + 4 * (cond[:, :3] - uncond[:, :3]), atol=1e-4)


def test_cfg_model_needs_a_null_label_and_labels():
    plain = create_model(16, 32, 1, channel_mult="1,2", class_cond=True, attention_resolutions="8",
                         num_classes=NUM_CLASSES)
    assert cfg_model(plain, 1.0) is plain
    with pytest.raises(ValueError, match="--class_dropout_prob"):
        cfg_model(plain, 2.0)
    with pytest.raises(ValueError, match="labels"):
        cfg_model(tiny_unet(), 2.0)(th.randn(1, 3, 16, 16), th.tensor([3]))


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_cfg_w0_w1_reproduce_the_unconditional_and_conditional_samplers(name):
    # DDPM uses the learned variance, which CFG takes from the conditional branch even at w = 0:
    # compare it on a fixed-variance model. The ODE samplers ignore the variance channels.
    learn_sigma = name != "ddpm"
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=learn_sigma)
    model = GaussianClassModel(diffusion.alphas_cumprod, learn_sigma=learn_sigma)
    shape, y = (6, 2, 1, 1), th.tensor([0, 1, 2, 0, 1, 2])
    null = th.full_like(y, NUM_CLASSES)

    def run(cfg_scale, labels):
        th.manual_seed(0)  # DDPM's step noise
        return sample(diffusion, model, shape, noise=noise(shape), clip_denoised=False,
                      device="cpu", model_kwargs={"y": labels}, sampler=name, steps=10,
                      cfg_scale=cfg_scale)

    cond = run(1.0, y)
    assert th.equal(cond, run(1.0, y))  # deterministic given the seed
    assert th.allclose(run(0.0, y), run(1.0, null), atol=0)
    assert not th.allclose(cond, run(0.0, y), atol=0.05)


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "heun"])
def test_cfg_extrapolates_gaussian_class_means(name):
    """
    With a shared variance, eps is affine in the class mean, so CFG at weight w samples exactly
    N((1 - w) mean_null + w mean_y, s^2): the guided samplers' moments must show that mean.
    """
    diffusion = create_gaussian_diffusion(steps=1000)
    model = GaussianClassModel(diffusion.alphas_cumprod)
    shape = (4096, 2, 1, 1)
    y = th.full((shape[0],), 2)
    w = 2.5
    # Grids that keep the top (x_T drawn there): `edm` (auto's choice for ddim and dpm++2m) starts
    # at sigma~ 20 and drops the data's share alpha_c x_0 of the sample there, a bias of ~S/20 in
    # the mean that this exact check (5 standard errors of 8192 values) would see.
    x = sample(diffusion, model, shape, noise=noise(shape), clip_denoised=False, device="cpu",
               model_kwargs={"y": y}, sampler=name, steps=250 if name == "ddim" else 25,
               sampler_spacing="karras" if name == "dpm++2m" else "uniform", sigma_max=80.0,
               cfg_scale=w)
    target = (1 - w) * CLASS_MEANS[NUM_CLASSES] + w * CLASS_MEANS[2]  # 1.5
    n = x.numel()
    assert abs(x.mean().item() - target.item()) < 5 * S / math.sqrt(n)
    assert abs(x.std().item() - S) < 0.02


def test_cfg_and_classifier_guidance_compose_in_the_score():
    """Denoiser eps = (1 - w) eps_u + w eps_c - sqrt(1 - abar) * cond_fn(x, original t)."""
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="50")
    base_acp = create_gaussian_diffusion(steps=1000).alphas_cumprod
    model = GaussianClassModel(base_acp)
    grad = th.tensor([0.7, -0.3], dtype=th.float64).view(1, 2, 1, 1)
    seen = []

    def cond_fn(x, t, y=None):
        seen.append(t.clone())
        return grad.expand_as(x)

    x, y = noise((3, 2, 1, 1)), th.tensor([0, 1, 2])
    w, i = 2.0, 20  # grid index 20 of the respaced diffusion
    den = Denoiser(diffusion, cfg_model(model, w), clip_denoised=False, cond_fn=cond_fn,
                   model_kwargs={"y": y})
    got = den(x, i).eps
    t_orig = th.full((3,), diffusion.timestep_map[i])
    assert th.equal(seen[0], t_orig)
    eps_c, eps_u = model(x, t_orig, y), model(x, t_orig, th.full_like(y, NUM_CLASSES))
    expected = (1 - w) * eps_u + w * eps_c - math.sqrt(1 - base_acp[t_orig[0]]) * grad
    assert th.allclose(got, expected, atol=1e-6)


def test_classifier_cond_fn_is_the_scaled_log_prob_gradient():
    th.manual_seed(0)
    classifier = create_classifier(16, False, 32, 1, "8", True, True, "attention",
                                   classifier_channel_mult="1,2", num_classes=NUM_CLASSES).eval()
    x, t, y = th.randn(2, 3, 16, 16), th.tensor([5, 400]), th.tensor([2, 0])
    g = classifier_cond_fn(classifier, 3.0)(x, t, y=y)
    # Directional derivative check: log p(y|x + h v) - log p(y|x - h v) ~ 2 h <grad, v>.
    v, h = th.randn_like(x), 1e-2

    def logp(z):
        with th.no_grad():
            return th.log_softmax(classifier(z, t), -1)[th.arange(2), y]

    fd = (logp(x + h * v) - logp(x - h * v)) / (2 * h)
    assert th.allclose((g * v).flatten(1).sum(1) / 3.0, fd, rtol=2e-2, atol=1e-4)
