"""What a training step costs (FLOPs, memory), measured on the meta device: `--dry_run`'s numbers.
"""

from __future__ import annotations

import math

import torch as th
from torch.utils.flop_counter import FlopCounterMode


def training_cost(
    model: th.nn.Module,
    inputs: dict,
    batch_size: int,
    microbatch: int,
    n_ema: int,
    precision: str = "fp32",
) -> dict:
    """
    What one training step costs, measured by running one microbatch forward and backward on
    the meta device (shapes only: no memory, no arithmetic). Build `model` under
    `torch.device("meta")` for big layouts.

    :param model: the network (any device; its parameters are counted).
    :param inputs: the forward's keyword arguments for ONE microbatch, e.g. {'x': [m x C x H x W],
        'timesteps': [m]} (meta tensors are fine).
    :param batch_size: images per rank per step; `microbatch` (<= 0: the batch) per pass.
    :param n_ema: EMA copies kept.
    :param precision: "fp32", "bf16" or "fp16" (memory of weights, grads and activations).
    :return: dict with 'params', 'flops_per_step' (forward + backward, all passes of one rank),
        'state_bytes' (weights, grads, AdamW, EMA, fp16 master copy), 'activation_bytes' (saved
        for backward in one pass: an upper estimate) and 'total_bytes'.
    """
    microbatch = microbatch if 0 < microbatch < batch_size else batch_size
    passes = math.ceil(batch_size / microbatch)
    params = sum(p.numel() for p in model.parameters())
    saved = [0]
    weights = {id(p) for p in model.parameters()}

    def pack(t: th.Tensor):
        if id(t) not in weights:  # the weights themselves are counted in the state
            saved[0] += t.numel() * t.element_size()
        return t

    with FlopCounterMode(display=False) as counter:
        with th.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**inputs)
        out.float().mean().backward()
    # Mixed precision halves the activations; fp16 keeps fp16 weights and grads plus a float32
    # master copy with its own grads; AdamW keeps two float32 moments; each EMA one copy.
    half = precision in ("fp16", "bf16")
    per_param = 4 + 4 + 8 + 4 * n_ema + (2 + 2 if precision == "fp16" else 0)
    state = params * per_param
    activations = saved[0] // 2 if half else saved[0]
    return dict(
        params=params, flops_per_step=counter.get_total_flops() * passes, passes=passes,
        state_bytes=state, activation_bytes=activations, total_bytes=state + activations,
    )


