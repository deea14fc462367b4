"""
Tests of the evaluator's streaming side: 'tf' preprocessing by default, shard folders read like
the merged .npz, FID/sFID statistics and Inception Score accumulated batch by batch, bounded
memory, and outputs that a failed or killed run never damages.

A stub network (fixed projections of per-image pixel statistics) stands in for Inception where
only the plumbing is under test: it is per-image, deterministic and fast.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
import warnings

import numpy as np
import pytest
import torch as th

from evaluations import evaluator as E
from evaluations import inception as I
from evaluations import npz_io
from evaluations.make_reference_batch import DEFAULTS as REFERENCE_DEFAULTS
from evaluations.make_reference_batch import make_reference_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StubInception(th.nn.Module):
    """
    FIDInceptionV3's interface (features() -> pool / spatial / logits, fc, preprocessing) on
    9 pixel statistics per image: per-channel mean, standard deviation and mean square.
    """

    def __init__(self, preprocessing: str = "tf", pool_dim: int = 8, spatial_dim: int = 5,
                 classes: int = 10):
        super().__init__()
        self.preprocessing = preprocessing
        g = th.Generator().manual_seed(0)
        self.pool_proj = th.nn.Parameter(th.randn(9, pool_dim, generator=g))
        self.spatial_proj = th.nn.Parameter(th.randn(9, spatial_dim, generator=g))
        self.fc = th.nn.Linear(pool_dim, classes)
        with th.no_grad():
            self.fc.weight.copy_(th.randn(classes, pool_dim, generator=g))
        self.calls = 0

    def features(self, images: th.Tensor) -> dict:
        self.calls += 1
        x = images.float().flatten(1, 2) / 255  # [N x HW x 3]
        s = th.cat([x.mean(1), x.std(1), (x * x).mean(1)], dim=1)
        pool = th.tanh(s @ self.pool_proj)
        return dict(pool=pool, spatial=s @ self.spatial_proj, logits=pool @ self.fc.weight.t())


def _images(seed: int, n: int, size: int = 8) -> np.ndarray:
    """n images, each at its own brightness (so the stub's features vary between images)."""
    rng = np.random.default_rng(seed)
    level = rng.integers(30, 220, (n, 1, 1, 3))
    return np.clip(level + rng.integers(-30, 30, (n, size, size, 3)), 0, 255).astype(np.uint8)


def _write_shards(folder, images, bounds, labels=None, num_samples=None):
    """Write images[start:stop] as shard files for each (start, stop) and a manifest."""
    os.makedirs(folder, exist_ok=True)
    for start, stop in bounds:
        arrays = dict(arr_0=images[start:stop])
        if labels is not None:
            arrays["arr_1"] = labels[start:stop]
        np.savez(os.path.join(folder, npz_io.shard_name(start, stop)), **arrays)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"num_samples": len(images) if num_samples is None else num_samples}, f)
    return str(folder)


# ---------------------------------------------------------------- preprocessing

def test_default_preprocessing_is_tf_and_pytorch_fid_warns_against_precomputed_statistics(tmp_path):
    assert E.create_argparser().parse_args(["r", "s"]).preprocessing == "tf"
    assert REFERENCE_DEFAULTS["preprocessing"] == "tf"
    assert I.FIDInceptionV3().preprocessing == "tf"
    ref = str(tmp_path / "ref.npz")  # a reference batch with precomputed statistics
    np.savez(ref, arr_0=_images(0, 6), mu=np.zeros(8), sigma=np.eye(8), mu_s=np.zeros(5),
             sigma_s=np.eye(5))
    sample = str(tmp_path / "sample.npz")
    np.savez(sample, arr_0=_images(1, 6))
    pytorch_fid = E.Evaluator(StubInception("pytorch_fid"), device="cpu", progress=False)
    with pytest.warns(UserWarning, match="made with 'tf' preprocessing, these .* 'pytorch_fid'"):
        pytorch_fid.evaluate(ref, sample)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default raises no warning
        E.Evaluator(StubInception(), device="cpu", progress=False).evaluate(ref, sample)
    # A batch of make_reference_batch records its preprocessing, and the check follows it.
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i, image in enumerate(_images(15, 4)):
        Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
    own = str(tmp_path / "own.npz")
    make_reference_batch(str(tmp_path / "images"), own, pytorch_fid)
    assert npz_io.statistics_preprocessing(own) == "pytorch_fid"
    assert npz_io.statistics_preprocessing(ref) == "tf"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pytorch_fid.evaluate(own, sample)


def test_tf_and_pytorch_fid_inputs_differ_at_64px_by_resize_and_at_299px_by_scaling_only():
    rng = np.random.default_rng(2)
    model = I.FIDInceptionV3().eval()  # random weights: only the inputs and their effect matter

    def inputs(images, mode):
        model.preprocessing = mode
        return model.preprocess(th.from_numpy(images))

    for size in (64, 299):
        images = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        tf, pt = inputs(images, "tf"), inputs(images, "pytorch_fid")
        # Undo each scaling: tf is (x - 128) / 128, pytorch_fid (x - 127.5) / 127.5.
        tf_pixels, pt_pixels = tf * 128 + 128, pt * 127.5 + 127.5
        gap = (tf_pixels - pt_pixels).abs().max().item()
        if size == 299:  # no resize: the same pixels, scaled differently
            assert gap < 1e-3 and not th.allclose(tf, pt, atol=1e-3)
        else:  # the half-pixel shift moves the samples: pixel values differ by whole levels
            assert gap > 10
    with th.no_grad():
        images = th.from_numpy(rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))
        model.preprocessing = "tf"
        tf_pool = model.features(images)["pool"]
        model.preprocessing = "pytorch_fid"
        pt_pool = model.features(images)["pool"]
    assert (tf_pool - pt_pool).abs().max() > 1e-3 * tf_pool.abs().max()


# ---------------------------------------------------------------- shard folders

def test_shard_folder_reads_like_the_merged_npz(tmp_path):
    images = _images(3, 23)
    labels = np.arange(23, dtype=np.int64) % 4
    folder = _write_shards(tmp_path / "shards", images, [(12, 23), (0, 5), (5, 12)], labels)
    with open(os.path.join(folder, f".{npz_io.shard_name(23, 30)}.1234.tmp"), "wb") as f:
        f.write(b"partial write in progress")  # hidden: ignored
    merged = str(tmp_path / "merged.npz")
    np.savez(merged, arr_0=images, arr_1=labels)
    with npz_io.open_image_batch(folder, min_images=2) as shards, \
            npz_io.open_image_batch(merged) as whole:
        assert isinstance(shards, npz_io.ShardFolderReader)
        assert (shards.shape, shards.dtype, len(shards)) == (whole.shape, whole.dtype, 23)
        got, want = list(shards.batches(4)), list(whole.batches(4))
    # The same batches (sizes included: they cross shard boundaries), rows in index order.
    assert [b.shape for b in got] == [b.shape for b in want]
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert shards.max_batch_rows == 4
    with npz_io.ShardFolderReader(folder, "arr_1") as reader:
        assert np.array_equal(np.concatenate(list(reader.batches(6))), labels)
    assert npz_io.read_precomputed_statistics(folder) is None
    png_dir = str(tmp_path / "pngs")  # npz_to_png reads folders the same way
    assert npz_io.npz_to_images(folder, png_dir, batch_size=4) == 23
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(os.path.join(png_dir, "000017.png"))), images[17])
    assert not [name for name in os.listdir(png_dir) if name.startswith(".")]


def test_incomplete_or_inconsistent_shard_folders_are_refused_in_one_line(tmp_path):
    images = _images(4, 20)
    cases = [  # (shard bounds, num_samples, expected message)
        ([(0, 5), (12, 20)], 20, r"incomplete: samples \[5, 12\) of 20 are missing"),
        ([(5, 12), (12, 20)], 20, r"incomplete: samples \[0, 5\) of 20 are missing"),
        ([(0, 5), (5, 12)], 20, r"incomplete: samples \[12, 20\) of 20 are missing"),
        ([(0, 5), (5, 12), (15, 18)], 20, r"samples \[12, 15\) of 20 are missing"),
        ([(0, 12), (5, 20)], 20, "overlaps the shard before it"),
        ([(0, 12), (12, 20)], 15, "ends at 20, past num_samples=15"),
        ([], 20, r"samples \[0, 20\) of 20 are missing"),
    ]
    for i, (bounds, num_samples, match) in enumerate(cases):
        folder = _write_shards(tmp_path / f"case{i}", images, bounds, num_samples=num_samples)
        with pytest.raises(ValueError, match=match) as err:
            npz_io.open_image_batch(folder)
        assert "\n" not in str(err.value) and str(tmp_path / f"case{i}") in str(err.value)

    folder = _write_shards(tmp_path / "rows", images, [(0, 10), (10, 20)])
    np.savez(os.path.join(folder, npz_io.shard_name(10, 20)), arr_0=images[10:19])
    with pytest.raises(ValueError, match=r"samples_00000010-00000020.npz: 'arr_0' has shape "
                                         r"\(9, 8, 8, 3\); its name says 10 rows"):
        npz_io.open_image_batch(folder)
    folder = _write_shards(tmp_path / "size", images, [(0, 10), (10, 20)])
    np.savez(os.path.join(folder, npz_io.shard_name(10, 20)), arr_0=_images(4, 10, size=4))
    with pytest.raises(ValueError, match="the first shard's"):
        npz_io.open_image_batch(folder)
    labels = np.zeros(20, dtype=np.int64)
    folder = _write_shards(tmp_path / "labels", images, [(0, 10)], labels, num_samples=20)
    np.savez(os.path.join(folder, npz_io.shard_name(10, 20)), arr_0=images[10:])
    with pytest.raises(ValueError, match="some shards have labels"):
        npz_io.open_image_batch(folder)

    folder = tmp_path / "no_manifest"
    folder.mkdir()
    with pytest.raises(ValueError, match="without manifest.json"):
        npz_io.open_image_batch(str(folder))
    (folder / "manifest.json").write_text('{"count": 3}')
    with pytest.raises(ValueError, match="manifest.json: not a JSON object with \"num_samples\""):
        npz_io.open_image_batch(str(folder))
    (folder / "manifest.json").write_text('{"num_samples": "3"}')
    with pytest.raises(ValueError, match="expected a positive integer"):
        npz_io.open_image_batch(str(folder))


def test_evaluate_gives_the_same_numbers_on_a_shard_folder_and_the_merged_npz(tmp_path):
    ref_images, sample_images = _images(5, 30), _images(6, 27)
    ref, merged = str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")
    np.savez(ref, arr_0=ref_images)
    np.savez(merged, arr_0=sample_images)
    folder = _write_shards(tmp_path / "sample", sample_images, [(0, 4), (4, 17), (17, 27)])
    ref_folder = _write_shards(tmp_path / "ref", ref_images, [(0, 29), (29, 30)])
    evaluator = E.Evaluator(StubInception(), batch_size=5, device="cpu", progress=False)
    want = evaluator.evaluate(ref, merged)
    assert evaluator.evaluate(ref, folder) == want
    assert evaluator.evaluate(ref_folder, folder) == want
    assert want["fid"] > 0.01 and want["inception_score"] > 1.0  # not a degenerate comparison
    # The streamed numbers are the whole-array formulas' (within round-off of the batch sums).
    pool, spatial = evaluator.read_activations(merged)
    ref_pool, ref_spatial = evaluator.read_activations(ref)
    fid = E.compute_statistics(pool).frechet_distance(E.compute_statistics(ref_pool))
    assert want["fid"] == pytest.approx(fid, rel=1e-9)
    score = evaluator.compute_inception_score(pool)
    assert want["inception_score"] == pytest.approx(score, rel=1e-6)
    assert (want["precision"], want["recall"]) == evaluator.compute_prec_recall(ref_pool, pool)


def test_cli_reads_a_shard_folder_and_refuses_an_incomplete_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(E, "load_fid_inception",
                        lambda *a, preprocessing, **k: StubInception(preprocessing))
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=_images(7, 12))
    folder = _write_shards(tmp_path / "samples", _images(8, 12), [(0, 6), (6, 12)])
    out = str(tmp_path / "metrics.json")
    metrics = E.main([ref, folder, "--device", "cpu", "--output", out,
                      "--preprocessing", "pytorch_fid"])
    header = "Computing evaluations (Inception preprocessing: pytorch_fid)..."
    assert header in capsys.readouterr().out
    with open(out) as f:
        record = json.load(f)
    assert record["preprocessing"] == "pytorch_fid" and record["fid"] == metrics["fid"]
    os.remove(os.path.join(folder, npz_io.shard_name(6, 12)))
    with pytest.raises(SystemExit) as err:
        npz_io.run_main(lambda: E.main([ref, folder, "--device", "cpu"]), "evaluator.py")
    assert str(err.value.code) == (
        f"evaluator.py: error: {folder}: incomplete: samples [6, 12) of 12 are missing "
        f"(no samples_00000006-00000012.npz or shards covering it)")


# ---------------------------------------------------------------- streaming statistics

def test_streaming_statistics_equal_np_cov_to_1e_10():
    rng = np.random.default_rng(9)
    # A large common offset: the case where sum(x x^T) - n mu mu^T would cancel catastrophically.
    mix = rng.normal(size=(16, 16))
    features = (1000.0 + rng.normal(size=(1003, 16)) @ mix).astype(np.float32)
    running = E.RunningStatistics()
    start = 0
    for size in (1, 2, 64, 500, 7, 429):  # uneven batches, a single row among them
        running.add(features[start:start + size])
        start += size
    assert start == len(features)
    stats = running.statistics()
    x = features.astype(np.float64)
    want_mu, want_sigma = x.mean(axis=0), np.cov(x, rowvar=False)
    assert np.abs(stats.mu - want_mu).max() <= 1e-10 * np.abs(want_mu).max()
    assert np.abs(stats.sigma - want_sigma).max() <= 1e-10 * np.abs(want_sigma).max()
    whole = E.compute_statistics(features)
    assert np.abs(whole.sigma - want_sigma).max() <= 1e-10 * np.abs(want_sigma).max()
    with pytest.raises(ValueError, match="N >= 2"):
        E.RunningStatistics().statistics()
    with pytest.raises(ValueError, match=r"\[n x 16\]"):
        running.add(features[:3, :4])


def test_streaming_inception_score_scores_each_split_as_the_whole_array():
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(23, 6)) * 3
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)

    def split_score(p):  # exp(E KL(p(y|x) || p(y))), written out here
        marginal = p.mean(0)
        return np.exp(np.mean([np.sum(row * np.log(row / marginal)) for row in p]))

    want = np.mean([split_score(probs[i:i + 7]) for i in range(0, 23, 7)])  # 7, 7, 7, 2 rows
    running = E.RunningInceptionScore(split_size=7)
    for start, stop in ((0, 3), (3, 12), (12, 13), (13, 23)):  # batches straddle the splits
        running.add(probs[start:stop])
    assert len(running.split_scores) == 3  # completed splits are scored, their rows dropped
    assert running.score() == pytest.approx(want, rel=1e-5)
    assert E.inception_score(probs, split_size=7) == pytest.approx(want, rel=1e-5)


def test_peak_memory_of_a_shard_folder_is_bounded_by_a_shard_not_the_folder(tmp_path):
    evaluator = E.Evaluator(StubInception(), batch_size=100, device="cpu", progress=False)
    peaks = {}
    for n in (2000, 20000):
        images = _images(11, n)  # 192 bytes each: 3.8 MB for 20,000
        folder = _write_shards(tmp_path / str(n), images, [(s, s + 100) for s in range(0, n, 100)])
        del images
        # FID/sFID statistics alone; then with the Inception Score, which holds one split of
        # probabilities (5000 rows in the original's metric; 500 here, so both sizes fill one).
        for score in (False, True):
            tracemalloc.start()
            summary = evaluator.summarize(folder, inception_score=score, keep_pool=False,
                                          split_size=500)
            peaks[n, score] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert summary.num_images == n and summary.pool is None
    # Ten times the images: one shard stream and one batch are held at a time. What grows is the
    # folder's listing, under 1 KB per shard (180 more here), not the 3.5 MB of added images.
    for score in (False, True):
        assert peaks[20000, score] - peaks[2000, score] < 180 * 1000, peaks
        assert peaks[20000, score] < 20000 * 192 / 8, peaks


# ---------------------------------------------------------------- layering and atomic outputs

def test_reading_batches_imports_no_training_code(tmp_path):
    from PIL import Image

    from guided_diffusion import image_datasets, image_util

    assert image_datasets.center_crop_arr is image_util.center_crop_arr  # original public name
    Image.fromarray(_images(14, 1, size=20)[0]).save(tmp_path / "a.png")
    script = textwrap.dedent(f"""
        import sys
        from evaluations import npz_io
        image = npz_io.load_image({str(tmp_path / "a.png")!r}, image_size=8)
        assert image.shape == (8, 8, 3), image.shape
        print(sorted(m for m in sys.modules if m.startswith("guided_diffusion")))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # The foundation (errors, file I/O) and image_util only: the layers contract, also at run time.
    assert proc.stdout.strip() == ("['guided_diffusion', 'guided_diffusion.errors', "
                                   "'guided_diffusion.fileio', 'guided_diffusion.image_util']")


def test_failed_make_reference_batch_rerun_leaves_the_good_batch_byte_identical(tmp_path):
    from PIL import Image

    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for i, image in enumerate(_images(12, 6)):
        Image.fromarray(image).save(image_dir / f"{i:02d}.png")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = str(out_dir / "ref.npz")
    model = StubInception()
    evaluator = E.Evaluator(model, batch_size=2, device="cpu", progress=False)
    assert make_reference_batch(str(image_dir), out, evaluator) == 6
    good = open(out, "rb").read()
    with np.load(out, allow_pickle=False) as z:
        assert set(z.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s", "preprocessing"}

    (image_dir / "03.png").write_bytes(b"not a png")  # the rerun fails at its second batch
    seen = []
    features = model.features

    def watching(images):  # while the rerun writes, the final name still holds the good file
        seen.append(open(out, "rb").read() == good)
        return features(images)

    model.features = watching
    with pytest.raises(ValueError, match="03.png: not a readable image"):
        make_reference_batch(str(image_dir), out, evaluator)
    assert seen == [True] and open(out, "rb").read() == good
    assert os.listdir(out_dir) == ["ref.npz"]  # the temporary file was removed


def test_killed_writer_leaves_the_good_file_and_only_a_hidden_temporary(tmp_path):
    out = str(tmp_path / "ref.npz")
    np.savez(out, arr_0=_images(13, 4))
    good = open(out, "rb").read()
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from evaluations import npz_io

        def fill(writer):
            writer.write_batch(np.zeros((2, 8, 8, 3), np.uint8))
            print("half written", flush=True)
            time.sleep(60)

        npz_io.write_npz_atomically({out!r}, (4, 8, 8, 3), fill)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "half written"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert open(out, "rb").read() == good
    left = sorted(os.listdir(tmp_path))
    assert left[-1] == "ref.npz" and len(left) == 2 and left[0].startswith(".ref.npz.")
    assert left[0].endswith(".tmp")  # hidden: a shard folder reader ignores it
