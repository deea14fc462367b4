"""Test helpers shared by every test file: golden fixture paths and the deterministic crc32 init."""

from __future__ import annotations

import math
import pathlib
import zlib

import pytest
import torch as th
import torch.nn as nn

GOLDEN_DIR = pathlib.Path(__file__).parent / "fixtures" / "golden"


def load_golden(name: str) -> dict:
    """Load a golden fixture (e.g. "unet_adm32.pt") made with the original code."""
    return th.load(GOLDEN_DIR / name, map_location="cpu", weights_only=True)


def crc32_init_(model: nn.Module) -> nn.Module:
    """Overwrite every floating-point state_dict entry deterministically, from its name alone.

    This is the "crc32" init of the golden fixtures (see fixtures/golden/README.md): with
    r ~ N(0, 1) drawn from a generator seeded by crc32(name), matrices get r / sqrt(fan_in),
    1-D `...weight` entries (norm scales) 1 + 0.05 r, and everything else (biases) 0.05 r.
    Returns the model in eval mode.
    """
    new = {}
    for name, value in model.state_dict().items():
        if not value.is_floating_point():
            new[name] = value
            continue
        g = th.Generator().manual_seed(zlib.crc32(name.encode()))
        r = th.randn(value.shape, generator=g, dtype=th.float32)
        if value.ndim >= 2:
            r = r / math.sqrt(math.prod(value.shape[1:]))
        elif name.endswith("weight"):
            r = 1 + 0.05 * r
        else:
            r = 0.05 * r
        new[name] = r.to(value.dtype)
    model.load_state_dict(new)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models: extra threads only add synchronisation
    (and spinning on a busy machine; 40x slower seen at load 11 on 2 cores). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    saved = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(saved)


def assert_same_values(a, b, where: str) -> None:
    """Tensors equal bit for bit (torch.equal, same dtype) and every other value equal,
    recursively through dicts, lists and tuples (checkpoints, resume states)."""
    if isinstance(a, th.Tensor):
        assert isinstance(b, th.Tensor) and a.dtype == b.dtype and th.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_values(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_values(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)
