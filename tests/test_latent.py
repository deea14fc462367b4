"""Latent space (--latent_vae) through a tiny randomly initialised diffusers AutoencoderKL saved to
a temporary folder: geometry and scale from its config, the cached encodings (the VAE's posterior
moments of each image and its mirror, written once and reused), training 2 steps on latents and
sampling decoded images with the real scripts (in process), for DiT and U-Net, and the one-line
errors for a missing package, folder or hub id."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import numpy as np
import pytest
import torch as th

from conftest import assert_same_values
from guided_diffusion import cli, dist_util, latent, logger

diffusers = pytest.importorskip("diffusers")  # the `latent` extra (in `dev`, so CI runs these)

ROOT = pathlib.Path(__file__).resolve().parents[1]
PIXELS = 16


@pytest.fixture(autouse=True)
def _one_thread():
    n = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(n)
    logger.reset()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> pathlib.Path:
    """A 2-level AutoencoderKL (16 px -> 4 x 8 x 8 latents), random weights, save_pretrained."""
    th.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
        layers_per_block=1, sample_size=PIXELS, scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae") / "tiny_vae"
    vae.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    """Six 16 px images of 2 classes (file-name prefixes), not left-right symmetric."""
    from PIL import Image

    path = tmp_path_factory.mktemp("data")
    g = np.random.default_rng(0)
    for i in range(6):
        arr = (g.random((PIXELS, PIXELS, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(path / f"{'ab'[i % 2]}_{i}.png")
    return path


def test_geometry_and_scale_come_from_the_vae_config(vae_dir, tmp_path):
    space = latent.LatentSpace(str(vae_dir))
    assert (space.channels, space.factor, space.scale) == (4, 2, 0.5)
    assert space.shape(PIXELS) == (4, 8, 8)
    assert latent.LatentSpace(str(vae_dir), scale=0.25).scale == 0.25  # --latent_scale wins
    config = json.loads((vae_dir / "config.json").read_text())
    del config["scaling_factor"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert latent.LatentSpace(str(tmp_path)).scale == latent.SD_VAE_SCALE == 0.18215
    with pytest.raises(cli.ScriptError, match="not divisible by the VAE's downsampling factor 2"):
        space.model_size(15)


def test_cache_holds_the_vaes_moments_of_each_image_and_its_mirror_and_is_written_once(
        vae_dir, data_dir, tmp_path, monkeypatch):
    from guided_diffusion.image_datasets import ImageDataset, _list_image_files_recursively

    space = latent.LatentSpace(str(vae_dir))
    path = latent.ensure_latent_cache(str(data_dir), space, PIXELS, True, str(tmp_path))
    arrays = latent.read_latent_cache(path)
    assert arrays["mean"].shape == (6, 2, 4, 8, 8) and arrays["std"].shape == (6, 2, 4, 8, 8)
    assert arrays["labels"].tolist() == [0, 0, 0, 1, 1, 1]  # sorted files: a_*, then b_*
    files = _list_image_files_recursively(str(data_dir))
    x = th.from_numpy(ImageDataset(PIXELS, files, random_flip=False)[3][0])[None]
    with th.no_grad():
        dist = space.vae.encode(x).latent_dist
        mirror = space.vae.encode(x.flip(3)).latent_dist
    assert np.allclose(arrays["mean"][3, 0], dist.mean[0].numpy(), atol=1e-5)
    assert np.allclose(arrays["std"][3, 0], dist.std[0].numpy(), atol=1e-5)
    assert np.allclose(arrays["mean"][3, 1], mirror.mean[0].numpy(), atol=1e-5)

    # Reused: the same data, VAE and size never encode again ...
    monkeypatch.setattr(latent.LatentSpace, "encode_moments",
                        lambda *a: pytest.fail("encoded a cached data set again"))
    assert latent.ensure_latent_cache(str(data_dir), space, PIXELS, True, str(tmp_path)) == path
    # ... while another size or no flips is another file.
    monkeypatch.undo()
    other = latent.ensure_latent_cache(str(data_dir), space, PIXELS, False, str(tmp_path))
    assert other != path and latent.read_latent_cache(other)["mean"].shape[1] == 1
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path),
                                                   os.path.basename(other)])  # no temp files


def test_latent_batches_are_scaled_draws_from_the_cached_posteriors(vae_dir, data_dir, tmp_path):
    space = latent.LatentSpace(str(vae_dir))
    kwargs = dict(data_dir=str(data_dir), batch_size=3, image_size=PIXELS, class_cond=True,
                  random_flip=True, space=space, cache_dir=str(tmp_path))
    latent.load_latent_data(**kwargs)  # writes the cache
    (path,) = tmp_path.glob("latents_*.npz")
    # Replace the encodings by known ones: image i has mean 10 i + view (0: as is, 1: mirror)
    # and std 0 (exact draws) or 1 (unit noise); the loader must reuse this file.
    labels = np.array([3, 1, 4, 1, 5, 9])
    mean = (10 * np.arange(6)[:, None] + np.arange(2)[None]).astype(np.float32)
    mean = np.broadcast_to(mean[:, :, None, None, None], (6, 2, 4, 8, 8)).copy()
    for std, check in ((0.0, "exact"), (1.0, "noisy")):
        np.savez(path, mean=mean, std=np.full_like(mean, std), labels=labels)
        th.manual_seed(0)
        data = latent.load_latent_data(**kwargs)
        z, cond = zip(*(next(data) for _ in range(8)))
        z, y = th.cat(z) / space.scale, th.cat([c["y"] for c in cond])
        assert z.shape == (24, 4, 8, 8)
        centre = z.mean(dim=(1, 2, 3))
        image = (centre / 10).round().long()
        assert th.equal(y, th.from_numpy(labels)[image])  # each label is its image's
        if check == "exact":
            view = centre - 10 * image
            assert th.equal(z, centre[:, None, None, None].expand_as(z))
            assert set(view.round().tolist()) == {0.0, 1.0}  # both views are drawn
        else:
            assert 0.9 < (z - z.mean(dim=(1, 2, 3), keepdim=True)).std() < 1.1


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_latent_{name}", ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(name: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    try:
        _script(name).main()
    finally:
        dist_util.cleanup()


NETWORKS = {
    "dit": ["--model", "dit", "--dit_model", "DiT-S/2", "--dit_depth", "1", "--dit_hidden_size",
            "32", "--dit_num_heads", "2"],
    "unet": ["--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
             "--attention_resolutions", "4", "--num_head_channels", "32"],
}


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_train_two_steps_on_latents_then_sample_decoded_images(
        network, vae_dir, data_dir, tmp_path, monkeypatch):
    flags = [*NETWORKS[network], "--image_size", str(PIXELS), "--class_cond", "True",
             "--num_classes", "2", "--class_dropout_prob", "0.1", "--diffusion_steps", "50",
             "--latent_vae", str(vae_dir)]
    run = tmp_path / "run"
    _main("image_train.py", [*flags, "--data_dir", str(data_dir), "--batch_size", "2",
                             "--lr_anneal_steps", "2", "--save_interval", "2",
                             "--output_dir", str(run), "--seed", "0"], monkeypatch)
    caches = list((run / "latent_cache").glob("latents_*.npz"))
    assert len(caches) == 1  # beside the run, as --latent_cache '' says
    model = th.load(run / "model000002.pt", map_location="cpu", weights_only=True)
    first = "x_embedder.proj.weight" if network == "dit" else "input_blocks.0.0.weight"
    assert model[first].shape[1] == 4  # the model reads the VAE's 4 latent channels
    _main("image_sample.py", [*flags, "--model_path", str(run / "model000002.pt"),
                              "--sampler", "ddim", "--steps", "2", "--num_samples", "2",
                              "--batch_size", "2", "--seed", "0", "--progress", "False",
                              "--output_dir", str(tmp_path / "samples")], monkeypatch)
    with np.load(tmp_path / "samples" / "samples_2x16x16x3.npz", allow_pickle=False) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (2, PIXELS, PIXELS, 3)  # decoded pixels
    assert labels.shape == (2,) and images.std() > 0


def test_missing_diffusers_is_one_line_with_the_install_hint(vae_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    with pytest.raises(cli.ScriptError, match=r"pip install -e \.\[latent\]"):
        latent.LatentSpace(str(vae_dir))


def test_missing_folder_and_uncached_hub_id_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(cli.ScriptError, match="--latent_vae: no such folder"):
        latent.LatentSpace(str(tmp_path / "nowhere"))
    with pytest.raises(cli.ScriptError, match="no config.json"):
        latent.LatentSpace(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: no network in any case
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(cli.ScriptError, match="local_files_only=True, never downloaded"):
        latent.LatentSpace("someone/not-cached-vae")


def test_pixel_space_without_the_flag():
    space = latent.space_from_flags(type("Args", (), {"latent_vae": ""})())
    assert space.decode is None and space.shape(PIXELS) == (3, PIXELS, PIXELS)


def test_latent_run_killed_and_resumed_equals_the_uninterrupted_run(
        vae_dir, data_dir, tmp_path, monkeypatch):
    import shutil

    # 6 images, batch 2: 3 batches per epoch, so steps 3-4 cross into epoch 1 (a new order).
    flags = [*NETWORKS["dit"], "--image_size", str(PIXELS), "--class_cond", "True",
             "--num_classes", "2", "--diffusion_steps", "50", "--latent_vae", str(vae_dir),
             "--data_dir", str(data_dir), "--batch_size", "2", "--lr", "1e-3",
             "--lr_anneal_steps", "4", "--save_interval", "2", "--seed", "0",
             "--resume_checkpoint", "auto"]
    ref = tmp_path / "ref"
    _main("image_train.py", [*flags, "--output_dir", str(ref)], monkeypatch)
    # The run as a kill after step 2's checkpoint leaves it (the lock of a dead run aside).
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut, ignore=shutil.ignore_patterns("*000004.pt", "run.lock"))
    _main("image_train.py", [*flags, "--output_dir", str(cut)], monkeypatch)
    for name in ("model000004.pt", "ema_0.9999_000004.pt", "opt000004.pt"):
        assert_same_values(th.load(ref / name, weights_only=True),
                           th.load(cut / name, weights_only=True), name)
    resume = th.load(ref / "opt000002.pt", weights_only=True)["resume"]
    assert resume["ranks"][0]["data"]["train"]["batches_done"] == 2  # the stream's position


def test_latent_loader_state_continues_the_stream_bit_for_bit(vae_dir, data_dir, tmp_path):
    space = latent.LatentSpace(str(vae_dir))
    kwargs = dict(data_dir=str(data_dir), batch_size=4, image_size=PIXELS, class_cond=True,
                  random_flip=True, space=space, cache_dir=str(tmp_path), seed=5)
    whole = latent.load_latent_data(**kwargs)
    batches = [next(whole) for _ in range(5)]  # 1 batch per epoch: 5 orders and draws
    part = latent.load_latent_data(**kwargs)
    next(part), next(part)
    state = part.state_dict()
    resumed = latent.load_latent_data(**dict(kwargs, seed=None))  # the state's seed wins
    resumed.load_state_dict(state)
    for k in range(2, 5):
        z, cond = next(resumed)
        assert th.equal(z, batches[k][0]) and th.equal(cond["y"], batches[k][1]["y"]), k
    assert not th.equal(batches[0][0], batches[1][0])
