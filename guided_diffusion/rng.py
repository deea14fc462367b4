"""Every global random generator's state as plain tensors and values (foundation layer).

A checkpoint stores each rank's states (`TrainLoop.resume_state`) so that a resumed run draws the
same noise, timesteps, dropout masks and augmentations as an uninterrupted one; the values are
tensors and plain Python, so `torch.load(weights_only=True)` reads them back.
"""

from __future__ import annotations

import random

import numpy as np
import torch as th


def get_rng_state() -> dict:
    """
    This process's random states (torch CPU and CUDA, NumPy's and Python's global generators) as
    tensors and plain values, so that `torch.load(weights_only=True)` reads them back.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": th.get_rng_state(),
        "cuda": th.cuda.get_rng_state_all() if th.cuda.is_available() else [],
        "numpy": {
            "keys": th.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": version, "state": th.tensor(py_state, dtype=th.int64),
            "gauss_next": gauss_next,
        },
    }


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` returned (the CUDA states only when the GPU count matches)."""
    th.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and th.cuda.is_available() and len(cuda) == th.cuda.device_count():
        th.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
         n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
