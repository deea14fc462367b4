"""MixedPrecisionTrainer: loss scaling with injected gradients, the scale floor, fp16 and bf16
training steps on a tiny U-Net, and the loss scale's round trip through a checkpoint."""

import os

import pytest
import torch as th
import torch.nn as nn

from guided_diffusion import logger
from guided_diffusion.fp16_util import MixedPrecisionTrainer, convert_module_to_f16
from guided_diffusion.script_util import (
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import ClassifierTrainLoop, TrainLoop


@pytest.fixture(autouse=True)
def _quiet_logger(tmp_path):
    n = th.get_num_threads()
    th.set_num_threads(1)
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    yield
    th.set_num_threads(n)
    logger.reset()


class TwoGroups(nn.Module):
    """A conv (converted to fp16) and a linear (stays fp32), like the U-Net's blocks and
    embeddings."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.proj = nn.Linear(2, 2)

    def convert_to_fp16(self):
        self.conv.apply(convert_module_to_f16)


def scaled_grads(trainer, grads):
    """Put `grads` * 2**lg_loss_scale on the model's parameters, as a scaled backward would."""
    scale = 2**trainer.lg_loss_scale
    for p, g in zip(trainer.model_params, grads):
        p.grad = (g * scale).to(p.dtype)


def make_trainer(**kw):
    th.manual_seed(0)
    trainer = MixedPrecisionTrainer(model=TwoGroups(), use_fp16=True, **kw)
    opt = th.optim.SGD(trainer.master_params, lr=1.0)
    return trainer, opt


def test_fp16_step_unscales_every_gradient():
    trainer, opt = make_trainer(fp16_scale_growth=0.25, initial_lg_loss_scale=10.0)
    assert trainer.model.conv.weight.dtype == th.float16
    assert trainer.model.proj.weight.dtype == th.float32
    assert all(p.dtype == th.float32 for p in trainer.master_params)
    before = [p.detach().clone() for p in trainer.master_params]
    # Powers of two: exact in fp16 at any scale, so the update must be exactly -grad.
    grads = [th.full_like(p, 2.0**-i) for i, p in enumerate(before)]
    scaled_grads(trainer, grads)
    assert trainer.optimize(opt)
    for b, p, g in zip(before, trainer.master_params, grads):
        # The original unscaled only its first group: the others would move by 2**10 * g.
        assert th.equal(p.detach(), b - g)
    for master, p in zip(trainer.master_params, trainer.model_params):
        assert th.equal(p.detach(), master.detach().to(p.dtype))  # model weights follow masters
    assert trainer.lg_loss_scale == 10.25


def test_non_finite_gradients_skip_the_step_and_halve_the_scale():
    trainer, opt = make_trainer()
    before = [p.detach().clone() for p in trainer.master_params]
    grads = [th.ones_like(p) for p in before]
    grads[-1][0] = float("inf")  # only the last (fp32) group overflows
    scaled_grads(trainer, grads)
    assert trainer.optimize(opt) is False
    assert trainer.lg_loss_scale == 19.0
    assert all(th.equal(p.detach(), b) for p, b in zip(trainer.master_params, before))
    grads[-1][0] = float("nan")
    scaled_grads(trainer, grads)
    assert trainer.optimize(opt) is False and trainer.lg_loss_scale == 18.0


def test_loss_scale_floor_raises_a_clear_error():
    trainer, opt = make_trainer(initial_lg_loss_scale=1.0)
    nan_grads = [th.full_like(p, float("nan")) for p in trainer.master_params]
    scaled_grads(trainer, nan_grads)
    assert trainer.optimize(opt) is False  # 2**1 -> 2**0: one more try at scale 1
    scaled_grads(trainer, nan_grads)
    with pytest.raises(RuntimeError, match="diverged"):
        trainer.optimize(opt)


def test_fp16_and_bf16_are_exclusive():
    with pytest.raises(ValueError, match="exclusive"):
        MixedPrecisionTrainer(model=TwoGroups(), use_fp16=True, use_bf16=True)


def tiny(**overrides):
    flags = model_and_diffusion_defaults()
    flags.update(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
        attention_resolutions="8", num_heads=1, diffusion_steps=50, **overrides,
    )
    th.manual_seed(0)
    return create_model_and_diffusion(**flags)


def data():
    g = th.Generator().manual_seed(0)
    while True:
        yield th.randn(2, 3, 16, 16, generator=g), {}


def loop_for(tmp_path, steps, resume="", **kw):
    model, diffusion = tiny(use_fp16=kw.get("use_fp16", False))
    return TrainLoop(
        model=model, diffusion=diffusion, data=data(), batch_size=2, microbatch=-1, lr=1e-3,
        ema_rate="0.99", log_interval=100, save_interval=100, resume_checkpoint=resume,
        lr_anneal_steps=steps, **kw,
    )


def test_fp16_training_saves_float32_and_resumes_the_loss_scale(tmp_path):
    loop = loop_for(tmp_path, steps=1, use_fp16=True, fp16_scale_growth=0.25)
    assert loop.model.input_blocks[0][0].weight.dtype == th.float16
    loop.run_loop()
    assert loop.mp_trainer.lg_loss_scale == 20.25  # the step was taken (finite gradients)
    sd = th.load(tmp_path / "model000001.pt", weights_only=True)
    assert all(v.dtype == th.float32 for v in sd.values())
    for name, master in zip(loop.mp_trainer.param_names, loop.mp_trainer.master_params):
        assert th.equal(sd[name], master.detach())  # the float32 masters, not fp16 roundings

    resumed = loop_for(tmp_path, steps=1, resume="auto", use_fp16=True)
    assert resumed.resume_step == 1
    assert resumed.mp_trainer.lg_loss_scale == 20.25
    for a, b in zip(resumed.mp_trainer.master_params, loop.mp_trainer.master_params):
        # fp16 masters are copied from the loaded float32 weights before the fp16 conversion.
        assert th.equal(a.detach(), b.detach())


def test_bf16_runs_the_forward_in_bfloat16_with_float32_weights(tmp_path):
    loop = loop_for(tmp_path, steps=1, use_bf16=True)
    seen = []
    loop.model.input_blocks[0][0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = [p.detach().clone() for p in loop.model.parameters()]
    loop.run_loop()
    assert seen == [th.bfloat16]
    assert all(p.dtype == th.float32 for p in loop.model.parameters())
    # (The zero-initialized output layer is all that moves in a first step.)
    assert not all(th.equal(p, b) for p, b in zip(loop.model.parameters(), before))
    assert os.path.exists(tmp_path / "model000001.pt")


def test_classifier_fp16_starts_at_the_originals_loss_scale_and_resumes_it(tmp_path):
    flags = classifier_and_diffusion_defaults()
    flags.update(image_size=16, classifier_width=32, classifier_depth=1,
                 classifier_channel_mult="1,2", classifier_attention_resolutions="8",
                 classifier_use_fp16=True)

    def loop(iterations, resume=""):
        th.manual_seed(0)
        model, diffusion = create_classifier_and_diffusion(**flags)
        g = th.Generator().manual_seed(0)
        batches = iter(lambda: (th.randn(2, 3, 16, 16, generator=g), {"y": th.tensor([1, 2])}),
                       None)
        return ClassifierTrainLoop(
            model=model, diffusion=diffusion, data=batches, batch_size=2, microbatch=-1,
            lr=1e-3, iterations=iterations, resume_checkpoint=resume, use_fp16=True,
            fp16_scale_growth=0.5, save_interval=100,
        )

    first = loop(1)
    # classifier_train.py's loss scale starts at 2**16 (the diffusion loop's at 2**20).
    assert first.mp_trainer.lg_loss_scale == 16.0
    assert first.model.input_blocks[0][0].weight.dtype == th.float16
    first.run_loop()
    assert first.mp_trainer.lg_loss_scale == 16.5  # one good step grew it
    sd = th.load(tmp_path / "model000001.pt", weights_only=True)
    assert all(v.dtype == th.float32 for v in sd.values() if v.is_floating_point())
    resumed = loop(2, resume="auto")
    assert resumed.resume_step == 1 and resumed.mp_trainer.lg_loss_scale == 16.5
