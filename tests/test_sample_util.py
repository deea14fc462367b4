"""Sampling output: seeded per-index sampling, npz and grids (shards: test_sharded_sampling.py)."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch as th

from conftest import crc32_init_
from guided_diffusion import sample_util
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults


def test_per_sample_noise_depends_only_on_the_index():
    """Rows of one batch of 4 equal the rows of two batches of 2, and again on every draw."""
    noise = sample_util.PerSampleNoise
    gens = sample_util.sample_generators
    whole = noise(gens(7, [0, 1, 2, 3]))
    halves = [noise(gens(7, idx)) for idx in ([0, 1], [2, 3])]
    for _ in range(3):  # x_T, then step noise: the streams stay aligned
        a = whole.randn((4, 3, 5, 5))
        b = th.cat([h.randn((2, 3, 5, 5)) for h in halves])
        assert th.equal(a, b)
    # Different seeds and different indices give different noise.
    other = noise(gens(8, [0])).randn((1, 3, 5, 5))
    assert not th.equal(other[0], noise(gens(7, [0])).randn((1, 3, 5, 5))[0])
    assert not th.equal(a[0], a[1])


def test_seeded_labels_cover_classes_and_repeat():
    gens = sample_util.sample_generators(0, range(200))
    labels = sample_util.seeded_labels(gens, 10)
    assert labels.dtype == th.int64 and set(labels.tolist()) == set(range(10))
    again = sample_util.seeded_labels(sample_util.sample_generators(0, range(100, 200)), 10)
    assert th.equal(labels[100:], again)


def test_save_samples_writes_npz_and_grid_atomically(tmp_path):
    arr = np.random.RandomState(0).randint(0, 256, (6, 8, 8, 3)).astype(np.uint8)
    labels = np.array([3, 1, 2, 1, 0, 3])
    path = sample_util.save_samples(arr, labels, out_dir=str(tmp_path))
    assert os.path.basename(path) == "samples_6x8x8x3.npz"
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(f["arr_0"], arr)
        np.testing.assert_array_equal(f["arr_1"], labels)
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "samples_6x8x8x3.png"))
    # 2 rows x 3 columns of 8px tiles enlarged 8x to 64px, 2px padding.
    assert grid.shape == (2 * 66 + 2, 3 * 66 + 2, 3)
    # Sorted by label: the first tile is the sample labelled 0 (index 4).
    np.testing.assert_array_equal(grid[2:66:8, 2:66:8], arr[4])
    assert sorted(os.listdir(tmp_path)) == ["samples_6x8x8x3.npz", "samples_6x8x8x3.png"]
    # Unconditional: arr_0 only.
    path = sample_util.save_samples(arr[:2], None, out_dir=str(tmp_path), grid_size=0)
    with np.load(path, allow_pickle=False) as f:
        assert f.files == ["arr_0"]
    assert not (tmp_path / "samples_2x8x8x3.png").exists()


def _tiny_args(**overrides) -> argparse.Namespace:
    flags = model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="", class_cond=True, num_classes=4, diffusion_steps=50,
                 timestep_respacing="6", use_ddim=False, clip_denoised=True, seed=3, progress=False)
    flags.update(overrides)
    return argparse.Namespace(**flags)


@pytest.mark.parametrize("use_ddim", [False, True])
def test_seeded_samples_do_not_depend_on_batch_composition(use_ddim):
    """DDPM (noise at every step) and DDIM: sample i is the same in a batch of 4 or of 2."""
    args = _tiny_args(use_ddim=use_ddim)
    th.manual_seed(0)
    keys = model_and_diffusion_defaults().keys()
    model, diffusion = create_model_and_diffusion(**{k: getattr(args, k) for k in keys})
    model.eval()
    sample_fn = sample_util.make_sample_fn(model, diffusion, args, (3, 8, 8), num_classes=4)
    whole, y_whole = sample_fn([0, 1, 2, 3])
    parts = [sample_fn(idx) for idx in ([0, 1], [2, 3])]
    assert th.equal(y_whole, th.cat([p[1] for p in parts]))
    diff = (whole.int() - th.cat([p[0] for p in parts]).int()).abs().max().item()
    assert diff <= 1  # identical up to float rounding of batched convolutions
    assert not th.equal(whole[0], whole[1])
    # Another seed gives other samples.
    other, _ = sample_util.make_sample_fn(model, diffusion, _tiny_args(seed=4, use_ddim=use_ddim),
                                       (3, 8, 8), num_classes=4)([0, 1, 2, 3])
    assert (other.int() - whole.int()).abs().max() > 10


def test_sample_batch_takes_the_sampler_flags():
    """--sampler ddim runs the same loop as the original's --use_ddim True; dpm++2m another."""
    args = _tiny_args(clip_denoised=False)
    keys = model_and_diffusion_defaults().keys()
    model, diffusion = create_model_and_diffusion(**{k: getattr(args, k) for k in keys})
    crc32_init_(model).eval()  # non-zero weights: a fresh ADM model outputs zeros
    x_t = th.randn(2, 3, 8, 8, generator=th.Generator().manual_seed(0))
    kw = dict(model_kwargs={"y": th.tensor([0, 1])}, noise=x_t)
    run = lambda **flags: sample_util.sample_batch(
        model, diffusion, _tiny_args(clip_denoised=False, **flags), (2, 3, 8, 8), **kw)
    ddim = run(use_ddim=True)
    assert th.equal(run(sampler="ddim"), ddim)
    assert not th.allclose(run(sampler="dpm++2m", steps=3), ddim, atol=1e-3)


def test_saved_samples_are_readable_like_plain_files(tmp_path):
    """The temporary file of the atomic write must not leave the output private (0600)."""
    arr = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    umask = os.umask(0o022)
    try:
        path = sample_util.save_samples(arr, None, out_dir=str(tmp_path))
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.stat(path[:-4] + ".png").st_mode & 0o777 == 0o644
