"""Timestep samplers for training: which t each example is trained on, with importance weights.

Drawing t from a non-uniform p(t) and weighting the loss by 1 / (T p(t)) keeps the loss an
unbiased estimate of the uniform-t objective while reducing its variance
(Nichol & Dhariwal 2021, sec 3.3, eq. 18, for L_vlb).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist


def create_named_schedule_sampler(name: str, diffusion) -> "ScheduleSampler":
    """
    Create a ScheduleSampler from a library of pre-defined samplers.

    :param name: "uniform" or "loss-second-moment".
    :param diffusion: the diffusion object to sample timesteps for.
    """
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(
        f"unknown schedule sampler {name!r}: expected 'uniform' or 'loss-second-moment'"
    )


class ScheduleSampler(ABC):
    """
    A distribution over the diffusion timesteps, meant to reduce the variance of the objective.

    Subclasses only say how much weight each timestep gets (`weights()`); sampling and the
    importance weights that keep the objective unbiased are shared.
    """

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalized, positive weights, one per diffusion step: a [T] NumPy array."""

    def sample(self, batch_size: int, device) -> tuple[th.Tensor, th.Tensor]:
        """
        Importance-sample timesteps for a batch (uses NumPy's global random state).

        :param batch_size: the number of timesteps.
        :param device: the torch device to put the results on.
        :return: a tuple (timesteps, weights): [N] long timestep indices, and [N] float loss
                 weights 1 / (T p(t)) that make the weighted loss unbiased.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = th.from_numpy(weights_np).float().to(device)
        return indices, weights

    def state_dict(self) -> dict:
        """What a training resume must restore (tensors and plain values); {} when stateless."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s result."""


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely; all importance weights are 1."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler that adapts its weights to the losses observed during training."""

    def update_with_local_losses(self, local_ts: th.Tensor, local_losses: th.Tensor) -> None:
        """
        Update the reweighting using losses from this process's batch.

        With torch.distributed initialised this is a collective: every rank must call it, with
        its own (possibly different-sized) batch, so that all ranks keep identical weights.

        :param local_ts: an integer tensor of timesteps, [N].
        :param local_losses: a 1-D tensor of losses for those timesteps, [N].
        """
        if not (dist.is_available() and dist.is_initialized()):
            self.update_with_all_losses(local_ts.tolist(), local_losses.detach().tolist())
            return
        world = dist.get_world_size()
        device = local_ts.device
        batch_sizes = [th.zeros(1, dtype=th.int64, device=device) for _ in range(world)]
        dist.all_gather(batch_sizes, th.tensor([len(local_ts)], dtype=th.int64, device=device))
        batch_sizes = [int(b.item()) for b in batch_sizes]
        max_bs = max(batch_sizes)

        # all_gather needs equal sizes: pad every batch to the largest one, then cut it back.
        def gather_padded(local: th.Tensor) -> list:
            padded = th.zeros(max_bs, dtype=local.dtype, device=device)
            padded[: len(local)] = local.detach()
            parts = [th.zeros_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
            return [v for part, bs in zip(parts, batch_sizes) for v in part[:bs].tolist()]

        timesteps = gather_padded(local_ts)
        losses = gather_padded(local_losses)
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts: list, losses: list) -> None:
        """
        Update the reweighting using losses from the whole (all-rank) batch.

        :param ts: a list of int timesteps.
        :param losses: a list of float losses, one per timestep.
        """


class LossSecondMomentResampler(LossAwareSampler):
    """
    p(t) proportional to sqrt(E[L_t^2]) over the last `history_per_term` losses of each t, mixed
    with a little uniform mass (Nichol & Dhariwal 2021, eq. 18).  Uniform until every timestep
    has a full history.

    :param history_per_term: how many recent losses to keep per timestep.
    :param uniform_prob: the probability mass spread uniformly, so that no t is starved.
    """

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros(
            [diffusion.num_timesteps, history_per_term], dtype=np.float64
        )
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: list, losses: list) -> None:
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                # Full history: drop the oldest loss, append the newest.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def state_dict(self) -> dict:
        return {
            "loss_history": th.from_numpy(self._loss_history.copy()),
            "loss_counts": th.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        history = state["loss_history"].numpy().astype(np.float64)
        if history.shape != self._loss_history.shape:
            raise ValueError(
                f"the saved loss history has shape {tuple(history.shape)}, this sampler "
                f"{self._loss_history.shape} (other --diffusion_steps?)"
            )
        self._loss_history = history.copy()
        self._loss_counts = state["loss_counts"].numpy().astype(np.int64).copy()

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())
