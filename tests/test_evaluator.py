"""
Tests of evaluations/: the metrics against the original's numbers, the FID Inception network's
layout and features, streaming .npz batches, the command-line tools, and bad input.

No test downloads anything: the Inception network runs with random weights.
"""

import copy
import json
import os
import subprocess
import sys
import tracemalloc
import urllib.error
import zipfile

import numpy as np
import pytest
import torch as th

from evaluations import evaluator as E
from evaluations import inception as I
from evaluations import npz_io
from evaluations.make_reference_batch import create_argparser as make_reference_batch_parser
from evaluations.make_reference_batch import make_reference_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "golden")


# ---------------------------------------------------------------- metrics vs the original

def test_golden_metrics_match_original_evaluator():
    z = np.load(os.path.join(GOLDEN, "evaluator_metrics.npz"))
    f32 = lambda k: z[k].astype(np.float32)  # noqa: E731
    stats = {k: E.compute_statistics(f32(k)) for k in ("sample_pool", "ref_pool", "sample_spatial",
                                                       "ref_spatial")}
    fid = stats["sample_pool"].frechet_distance(stats["ref_pool"])
    sfid = stats["sample_spatial"].frechet_distance(stats["ref_spatial"])
    score = E.inception_score(f32("sample_probs"), split_size=5000)
    assert fid == pytest.approx(float(z["fid"]), rel=1e-4)
    assert sfid == pytest.approx(float(z["sfid"]), rel=1e-4)
    assert score == pytest.approx(float(z["inception_score"]), rel=1e-4)
    precision, recall = E.precision_recall(f32("ref_pool"), f32("sample_pool"))
    assert abs(precision - float(z["precision"])) <= 0.003
    assert abs(recall - float(z["recall"])) <= 0.003
    # Blocks of distances must not change the result: 97 x 130 blocks vs one 10k x 10k block.
    small = E.ManifoldEstimator(row_batch_size=97, col_batch_size=130)
    ref, sample = f32("ref_pool"), f32("sample_pool")
    p_small, r_small = small.evaluate_pr(ref, small.manifold_radii(ref),
                                         sample, small.manifold_radii(sample))
    assert (float(p_small[0]), float(r_small[0])) == (precision, recall)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.5, 2, size=6), rng.uniform(0.5, 2, size=6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = E.FIDStatistics(mu1, np.diag(v1)).frechet_distance(E.FIDStatistics(mu2, np.diag(v2)))
    assert got == pytest.approx(want, rel=1e-10)


def test_fid_of_a_batch_with_itself_is_zero_never_negative():
    acts = np.random.default_rng(1).normal(size=(50, 40)).astype(np.float32)
    stats = E.compute_statistics(acts)
    fid = stats.frechet_distance(E.compute_statistics(acts.copy()))
    assert 0.0 <= fid < 1e-6
    with pytest.raises(ValueError, match="different shapes"):
        stats.frechet_distance(E.compute_statistics(acts[:, :10]))


def test_inception_score_closed_form():
    # Each sample puts 1 - e on its own class, e / (C - 1) on the others; classes are balanced,
    # so p(y) is uniform and IS = exp(log C + sum_y p log p).
    classes, e = 10, 0.1
    p = np.full((classes, classes), e / (classes - 1))
    np.fill_diagonal(p, 1 - e)
    probs = np.tile(p, (30, 1)).astype(np.float64)
    want = np.exp(np.log(classes) + np.sum(p[0] * np.log(p[0])))
    assert E.inception_score(probs) == pytest.approx(want, rel=1e-10)
    # Two splits of different class sets: each split alone is scored as a whole.
    assert E.inception_score(np.full((20, 4), 0.25), split_size=10) == pytest.approx(1.0)


def test_float16_distances_fall_back_to_float32_on_overflow():
    est = E.ManifoldEstimator(device="cpu")
    small = th.tensor([[0.0, 1.0], [3.0, 4.0]])
    d = est.pairwise_distances(small, small)
    assert th.equal(d, th.tensor([[0.0, 18.0], [18.0, 0.0]]))
    # Squared norms of 300 * (1, 1) overflow float16 (max 65504): the float32 path must be taken.
    big = th.tensor([[300.0, 300.0], [301.0, 300.0]])
    d = est.pairwise_distances(big, big)
    assert th.isfinite(d).all() and d[0, 1].item() == pytest.approx(1.0, abs=0.05)


def test_precision_recall_of_identical_sets_and_evaluate():
    feats = np.random.default_rng(2).normal(size=(40, 8)).astype(np.float32)
    assert E.precision_recall(feats, feats, device="cpu") == (1.0, 1.0)
    far = feats + 100.0
    assert E.precision_recall(feats, far, device="cpu") == (0.0, 0.0)
    est = E.ManifoldEstimator(row_batch_size=7, col_batch_size=9, device="cpu")
    radii = est.manifold_radii(feats)
    inside, realism, nearest = est.evaluate(feats, radii, feats)
    assert inside.all() and (nearest == np.arange(len(feats))).all() and (realism > 1).all()
    with pytest.raises(ValueError, match="k=3"):
        est.manifold_radii(feats[:3])


# ---------------------------------------------------------------- the Inception network

@pytest.fixture(scope="module")
def random_inception():
    th.manual_seed(0)
    model = I.FIDInceptionV3().eval()
    with th.no_grad():  # non-trivial batch-norm statistics, so a wrong layer order shows
        for m in model.modules():
            if isinstance(m, th.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
        model.fc.bias.uniform_(-1, 1)
    return model


@pytest.fixture(scope="module")
def weights_file(random_inception, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    th.save(random_inception.state_dict(), path)
    return str(path)


def test_inception_state_dict_matches_pytorch_fid_weights_layout(random_inception, weights_file):
    with open(os.path.join(GOLDEN, "fid_inception_state_dict_keys.json")) as f:
        want = [(k, tuple(s)) for k, s in json.load(f)]
    got = [(k, tuple(v.shape)) for k, v in random_inception.state_dict().items()]
    assert got == want  # 566 entries: pt_inception-2015-12-05-6726825d.pth loads with strict=True
    loaded = I.load_fid_inception(weights_file)
    pairs = zip(loaded.state_dict().values(), random_inception.state_dict().values())
    assert all(th.equal(a, b) for a, b in pairs)


def test_inception_features_shapes_spatial_layout_and_bias_free_logits(random_inception):
    rng = np.random.default_rng(3)
    images = th.from_numpy(rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    captured = {}
    hook = random_inception.Mixed_6d.branch1x1.register_forward_hook(
        lambda m, i, o: captured.update(out=o))
    try:
        with th.no_grad():
            feats = random_inception.features(images)
    finally:
        hook.remove()
    assert feats["pool"].shape == (2, 2048)
    assert feats["spatial"].shape == (2, 2023)
    assert feats["logits"].shape == (2, 1008)
    # sFID features: first 7 channels of mixed_6/conv at 17x17, flattened H, W, C like TF.
    conv = captured["out"]
    assert conv.shape == (2, 192, 17, 17)
    assert th.equal(feats["spatial"].view(2, 17, 17, 7), conv[:, :7].permute(0, 2, 3, 1))
    assert feats["spatial"][0, 1].item() == conv[0, 1, 0, 0].item()  # channel varies fastest
    # The original's Inception Score multiplies pool_3 by the fc weights without the bias.
    assert th.allclose(feats["logits"], feats["pool"] @ random_inception.fc.weight.t())
    # Input: [0, 255] -> bilinear 299x299 -> (x - 128) / 128 (default 'tf', as the TF graph);
    # a constant image stays constant.
    assert random_inception.preprocessing == "tf"
    x = random_inception.preprocess(th.full((1, 16, 16, 3), 255, dtype=th.uint8))
    assert x.shape == (1, 3, 299, 299) and th.allclose(x, th.full_like(x, 127 / 128), atol=1e-6)


def test_tf_preprocessing_is_tf1_resize_bilinear_then_x_over_128_minus_1():
    # TF1 ResizeBilinear samples output i at input i * in / out, clamping at the last pixel:
    # 2 -> 4 pixels [0, 10] gives [0, 5, 10, 10] (no half-pixel centres, unlike PyTorch's).
    assert th.equal(I._tf1_bilinear_matrix(2, 4, "cpu") @ th.tensor([0.0, 10.0]),
                    th.tensor([0.0, 5.0, 10.0, 10.0]))
    assert th.allclose(I._tf1_bilinear_matrix(256, 299, "cpu").sum(1), th.ones(299))
    model = I.FIDInceptionV3(preprocessing="tf")
    rng = np.random.default_rng(7)
    images = th.from_numpy(rng.integers(0, 256, (1, 299, 299, 3), dtype=np.uint8))
    assert th.equal(model.preprocess(images), (images.permute(0, 3, 1, 2).float() - 128) / 128)
    ramp = th.arange(8.0).repeat(1, 8, 1).unsqueeze(-1).expand(1, 8, 8, 3)  # x = column index
    out = model.preprocess(ramp)[0, 0, 0] * 128 + 128
    assert th.allclose(out[:5], th.arange(5) * 8 / 299, atol=1e-4) and out[-1] == 7.0
    with pytest.raises(ValueError, match="preprocessing"):
        I.FIDInceptionV3(preprocessing="torchvision")


def test_inception_weights_errors_name_the_file_and_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(I.WEIGHTS_ENV_VAR, raising=False)

    def offline(url, dest):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(I, "_download", offline)
    with pytest.raises(FileNotFoundError) as err:
        I.resolve_weights_path(None)
    msg = str(err.value)
    assert I.WEIGHTS_URL in msg and I.default_weights_path() in msg and I.WEIGHTS_ENV_VAR in msg
    monkeypatch.setenv(I.WEIGHTS_ENV_VAR, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="GD_INCEPTION_PATH"):
        I.resolve_weights_path(None)
    bad = tmp_path / "bad.pth"
    th.save({"fc.weight": th.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="missing"):
        I.load_fid_inception(str(bad))


# ---------------------------------------------------------------- npz batches

def test_streaming_reader_never_holds_the_whole_array(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8)  # 6 MB
    for save in (np.savez, np.savez_compressed):  # stored and deflated zip members
        path = str(tmp_path / f"{save.__name__}.npz")
        save(path, arr_0=images, other=np.zeros(3))
        tracemalloc.start()
        with npz_io.NpzArrayReader(path) as reader:
            parts = []
            for batch in reader.batches(64):
                parts.append(batch[:, 0, 0].copy())  # keep a sliver, not the batch
            peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert reader.max_batch_rows == 64 and reader.rows_read == len(images)
        assert reader._memory is None
        # A few batches of 64 rows (zip buffers) at most, far from the 6 MB array.
        assert peak < images.nbytes / 4, f"{save.__name__}: peak {peak} bytes while streaming"
        assert np.array_equal(np.concatenate(parts), images[:, 0, 0])
    path = str(tmp_path / "fortran.npz")
    np.savez(path, arr_0=np.asfortranarray(images[:10]))
    with npz_io.NpzArrayReader(path) as reader:  # column-major: read whole, still correct
        assert np.array_equal(np.concatenate(list(reader.batches(3))), images[:10])


def test_writer_streams_rows_and_a_failed_rewrite_keeps_the_good_file(tmp_path):
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    path = str(tmp_path / "w.npz")

    def fill(writer):
        writer.write_batch(images[:2])
        writer.write_batch(images[2:])
        writer.add_array("mu", np.ones(3))

    npz_io.write_npz_atomically(path, images.shape, fill)
    with np.load(path, allow_pickle=False) as z:
        assert np.array_equal(z["arr_0"], images) and np.array_equal(z["mu"], np.ones(3))
    good = open(path, "rb").read()

    def short(writer):  # two rows of five, then the statistics: an incomplete batch
        writer.write_batch(images[:2])
        assert open(path, "rb").read() == good  # mid-write, the final name still holds the old file
        writer.add_array("mu", np.ones(3))

    with pytest.raises(ValueError, match="wrote 2 of 5"):
        npz_io.write_npz_atomically(path, images.shape, short)
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["w.npz"]  # no temp left
    with pytest.raises(TypeError, match="write_npz_atomically"):
        npz_io.NpzArrayWriter(path, images.shape)


def _bad_batches(tmp_path):
    ok = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    cases = {
        "no_arr_0": (dict(images=ok), "no array 'arr_0'"),
        "rank": (dict(arr_0=np.zeros((4, 8, 8), dtype=np.uint8)), "shape"),
        "dtype": (dict(arr_0=ok.astype(np.float32)), "dtype float32"),
        "one_image": (dict(arr_0=ok[:1]), "1 image"),
        "objects": (dict(arr_0=np.array([None, 1], dtype=object)), "Python objects"),
    }
    for name, (arrays, match) in cases.items():
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, **arrays)
        yield path, match
    path = str(tmp_path / "not_a_zip.npz")
    with open(path, "w") as f:
        f.write("hello")
    yield path, "not a readable .npz"


def test_bad_batches_raise_errors_naming_file_and_problem(tmp_path):
    for path, match in _bad_batches(tmp_path):
        with pytest.raises(ValueError, match=match) as err:
            npz_io.open_image_batch(path, min_images=2)
        assert path in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        npz_io.open_image_batch(str(tmp_path / "missing.npz"))
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    stats = dict(mu=np.zeros(2), sigma=np.eye(2), mu_s=np.zeros(2), sigma_s=np.eye(2))
    for name, change, match in (("nan", dict(mu=np.array([0.0, np.nan])), "'mu' contains NaN"),
                                ("partial", dict(sigma_s=None), r"not \['sigma_s'\]"),
                                ("shape", dict(sigma=np.eye(3)), "covariance")):
        arrays = {k: v for k, v in dict(stats, **change).items() if v is not None}
        path = str(tmp_path / f"stats_{name}.npz")
        np.savez(path, arr_0=images, **arrays)
        with pytest.raises(ValueError, match=match) as err:
            npz_io.read_precomputed_statistics(path)
        assert path in str(err.value)


# ---------------------------------------------------------------- end to end

def _tiny_images(seed, n=4, size=16):  # 4 = the fewest k=3 precision/recall accepts
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, size, size, 3))
    return np.clip(base + rng.integers(-40, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


def test_cli_end_to_end_on_tiny_batches(tmp_path, weights_file):
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=_tiny_images(5))
    out = str(tmp_path / "metrics.json")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluations", "evaluator.py"), ref, ref,
         "--inception_path", weights_file, "--output", out, "--device", "cpu", "--batch_size", "3"],
        capture_output=True, text=True, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    header, *lines = proc.stdout.strip().splitlines()
    assert header == "Computing evaluations (Inception preprocessing: tf)..."  # the default
    labels = [line.split(":")[0] for line in lines]
    assert labels == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    with open(out) as f:
        metrics = json.load(f)
    assert metrics["preprocessing"] == "tf" and metrics["sample_batch"] == ref
    assert 0.0 <= metrics["fid"] < 1e-3 and 0.0 <= metrics["sfid"] < 1e-3  # a batch against itself
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert metrics["inception_score"] >= 1.0
    assert f"FID: {metrics['fid']}" in lines
    # Bad input through the CLI: a clear one-line error, not a traceback.
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, images=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    proc = subprocess.run([sys.executable, "-m", "evaluations.evaluator", bad, ref,
                           "--inception_path", weights_file, "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and f"{bad}: no array 'arr_0'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fast_evaluator_takes_the_float32_switches_and_gives_the_same_features(
        tmp_path, weights_file, random_inception, monkeypatch, capsys):
    monkeypatch.setenv("GD_CPU_BF16", "1")  # a bf16 CPU: the preset's bf16 is still left out
    images = _tiny_images(7, n=6)
    plain = E.Evaluator(random_inception, device="cpu", progress=False)
    fast = E.Evaluator(copy.deepcopy(random_inception), device="cpu", progress=False, fast=True)
    assert fast.fast_line.startswith("fast path: channels_last (CPU bf16 instructions: GD_CPU")
    assert fast.fast_line.endswith("; the features stay float32)")
    for want, got in zip(plain.compute_activations([images]), fast.compute_activations([images])):
        assert got.dtype == np.float32  # channels_last convolutions round differently: ~2e-7
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    # Through the command line (a batch against itself: FID 0 without a matrix square root).
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=images)
    metrics = E.main([ref, ref, "--inception_path", weights_file, "--device", "cpu", "--fast",
                      "True"])
    out = capsys.readouterr().out
    assert out.startswith(fast.fast_line + "\n") and 0.0 <= metrics["fid"] < 1e-3
    with pytest.raises(SystemExit):  # only the preset is the evaluators' flag
        E.create_argparser().parse_args([ref, ref, "--use_bf16", "True"])
    assert make_reference_batch_parser().parse_args(["dir", "out.npz", "--fast", "True"]).fast


def test_fast_evaluator_on_a_gpu_takes_channels_last_only(random_inception, monkeypatch):
    monkeypatch.setattr(E.hardware, "detect",
                        lambda device: E.hardware.DeviceFacts("cuda", cuda_capability=(9, 0)))
    evaluator = E.Evaluator(copy.deepcopy(random_inception), device="cpu", progress=False,
                            fast=True)
    assert evaluator.fast_line == ("fast path: channels_last (CUDA compute capability 9.0; the "
                                   "features stay float32)")
    convs = [m.weight for m in evaluator.model.modules() if isinstance(m, th.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=th.channels_last) for w in convs)
    assert all(p.dtype == th.float32 for p in evaluator.model.parameters())
    assert E.Evaluator(random_inception, device="cpu", progress=False).fast_line == ""


def test_reference_batch_tools_round_trip_and_precomputed_statistics(tmp_path, random_inception):
    sample = str(tmp_path / "sample.npz")
    images = _tiny_images(6)
    np.savez(sample, arr_0=images)
    png_dir = str(tmp_path / "pngs")
    assert npz_io.npz_to_images(sample, png_dir) == len(images)
    assert sorted(os.listdir(png_dir))[0] == "000000.png"
    packed = str(tmp_path / "packed.npz")
    npz_io.images_to_npz(png_dir, packed, batch_size=2)
    with np.load(packed, allow_pickle=False) as z:
        assert np.array_equal(z["arr_0"], images)  # PNG is lossless

    evaluator = E.Evaluator(random_inception, batch_size=3, device="cpu", progress=False)
    ref = str(tmp_path / "ref.npz")
    assert make_reference_batch(png_dir, ref, evaluator) == len(images)
    acts = evaluator.read_activations(sample)
    with np.load(ref, allow_pickle=False) as z:
        assert np.array_equal(z["arr_0"], images)
        assert z["mu"].shape == (2048,) and z["sigma_s"].shape == (2023, 2023)
        assert np.allclose(z["mu"], acts[0].mean(0), atol=1e-6)
        arrays = {k: z[k] for k in z.files}
    ref_stats, ref_stats_spatial = evaluator.read_statistics(ref, acts)
    assert np.allclose(ref_stats.sigma, np.cov(acts[0], rowvar=False), rtol=1e-6, atol=1e-9)
    # The sample's statistics streamed in the same batches of 3 are the same bits, so FID skips
    # the 2048 x 2048 sqrtm (slow on a CPU) and is exactly 0.
    summary = evaluator.summarize(sample)
    sample_stats, sample_stats_spatial = summary.pool_stats, summary.spatial_stats
    assert sample_stats.frechet_distance(ref_stats) < 1e-6
    assert sample_stats_spatial.frechet_distance(ref_stats_spatial) < 1e-6
    # The precomputed statistics are what counts (as in the original): shift mu by 0.5 in every
    # dimension and FID grows by 2048 * 0.25.
    arrays["mu"] = arrays["mu"] + 0.5
    shifted = str(tmp_path / "shifted.npz")
    np.savez(shifted, **arrays)
    shifted_stats, _ = evaluator.read_statistics(shifted, acts)
    assert sample_stats.frechet_distance(shifted_stats) == pytest.approx(512.0, rel=1e-4)
    with zipfile.ZipFile(ref) as zf:  # stored, not compressed: streams without inflating
        assert zf.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED


def test_png_to_npz_sizes_must_agree_unless_resized(tmp_path):
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (20, 12), (255, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (12, 16), (0, 0, 255)).save(folder / "b.jpg")
    with pytest.raises(ValueError, match="b.jpg: is 12x16.*--image_size"):
        npz_io.images_to_npz(str(folder), str(tmp_path / "x.npz"))
    assert not os.path.exists(tmp_path / "x.npz")
    assert npz_io.images_to_npz(str(folder), str(tmp_path / "y.npz"), image_size=8) == 2
    with np.load(tmp_path / "y.npz", allow_pickle=False) as z:
        arr = z["arr_0"]
    assert arr.shape == (2, 8, 8, 3) and arr[0, 4, 4, 0] == 255 and arr[1, 4, 4, 2] > 200
