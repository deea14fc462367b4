"""Timestep samplers: importance weights, the loss-second-moment schedule, and its all-gather."""

from __future__ import annotations

import os
import socket
import types

import numpy as np
import pytest
import torch as th
import torch.distributed as dist
import torch.multiprocessing as mp

from guided_diffusion.resample import (
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)


def fake_diffusion(T):
    return types.SimpleNamespace(num_timesteps=T)


class FixedSampler(ScheduleSampler):
    def __init__(self, w):
        self.w = np.asarray(w, dtype=np.float64)

    def weights(self):
        return self.w


def test_named_samplers():
    assert isinstance(create_named_schedule_sampler("uniform", fake_diffusion(5)), UniformSampler)
    assert isinstance(
        create_named_schedule_sampler("loss-second-moment", fake_diffusion(5)),
        LossSecondMomentResampler,
    )
    with pytest.raises(ValueError, match="lossaware"):
        create_named_schedule_sampler("lossaware", fake_diffusion(5))


def test_uniform_sampler_has_unit_weights():
    np.random.seed(0)
    t, w = UniformSampler(fake_diffusion(7)).sample(500, "cpu")
    assert t.dtype == th.long and w.dtype == th.float32
    assert t.min() >= 0 and t.max() <= 6 and len(set(t.tolist())) == 7
    assert th.all(w == 1)


def test_importance_weights_are_unbiased():
    """weights = 1 / (T p(t)), so E_p[w(t) f(t)] = mean over t of f(t)."""
    np.random.seed(1)
    sampler = FixedSampler([1.0, 2.0, 3.0, 4.0])
    t, w = sampler.sample(100000, "cpu")
    p = np.array([1, 2, 3, 4]) / 10
    assert th.allclose(w, th.tensor(1 / (4 * p[t.numpy()])).float())
    freq = np.bincount(t.numpy(), minlength=4) / len(t)
    np.testing.assert_allclose(freq, p, atol=0.01)
    f = th.tensor([5.0, -1.0, 2.0, 10.0])
    assert (w * f[t]).mean().item() == pytest.approx(f.mean().item(), rel=0.02)


def test_loss_second_moment_warm_up_and_weights():
    T, hist = 4, 3
    sampler = LossSecondMomentResampler(fake_diffusion(T), history_per_term=hist, uniform_prob=0.1)
    # Uniform until every timestep has a full history.
    for _ in range(hist):
        sampler.update_with_local_losses(th.tensor([0, 1, 2]), th.tensor([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(sampler.weights(), np.ones(T))
    for loss in (100.0, 4.0, 4.0, 4.0):  # the oldest loss, 100, is pushed out of the history
        sampler.update_with_local_losses(th.tensor([3]), th.tensor([loss]))
    # p(t) ~ sqrt(E[L_t^2]) over the history, mixed with uniform_prob of uniform mass.
    rms = np.array([1.0, 2.0, 3.0, 4.0])
    want = 0.9 * rms / rms.sum() + 0.1 / T
    np.testing.assert_allclose(sampler.weights(), want, rtol=1e-12)
    assert sampler.weights().sum() == pytest.approx(1.0)


def _gather_worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sampler = LossSecondMomentResampler(fake_diffusion(5), history_per_term=2)
        # Ranks with different batch sizes, as the last batch of an epoch can have.
        ts = th.tensor([0, 1, 2]) if rank == 0 else th.tensor([3])
        losses = ts.float() + 10 * rank
        sampler.update_with_local_losses(ts, losses)
        queue.put((rank, sampler._loss_counts.tolist(), sampler._loss_history[:, 0].tolist()))
    finally:
        dist.destroy_process_group()


def test_update_with_local_losses_gathers_unequal_batches_across_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    # Both ranks saw all four losses, in rank order, and hold identical state.
    for _, counts, first in results:
        assert counts == [1, 1, 1, 1, 0]
        assert first == [0.0, 1.0, 2.0, 13.0, 0.0]
