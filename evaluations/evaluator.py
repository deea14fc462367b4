"""
FID, sFID, Inception Score, precision and recall of a sample batch against a reference batch.

    python evaluations/evaluator.py REF.npz SAMPLE.npz [--output metrics.json]

The same numbers as the original's TensorFlow evaluator, computed in PyTorch: the same batches
(`arr_0` = [N x H x W x 3] uint8; reference batches may carry precomputed `mu`, `sigma`, `mu_s`,
`sigma_s`; either batch may also be a shard folder, see npz_io), the same features
(FIDInceptionV3 = the 2015 TF Inception graph, fed as the TF graph resizes and scales images) and
the same formulas:
- FID (Heusel et al. 2017) on the 2048-d pool features; sFID (Nash et al. 2021) on 2023 spatial
  features of mixed_6/conv;
- Inception Score (Salimans et al. 2016) over splits of 5000 samples;
- improved precision and recall (Kynkaanniemi et al. 2019) with k=3 nearest-neighbour balls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch as th
from scipy import linalg
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as `python evaluations/evaluator.py`: import the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluations.inception import FIDInceptionV3, load_fid_inception  # noqa: E402
from evaluations.npz_io import (  # noqa: E402
    open_image_batch,
    read_precomputed_statistics,
    run_main,
    statistics_preprocessing,
)
from guided_diffusion import hardware  # noqa: E402
from guided_diffusion.config import EvaluatorConfig, FastConfig, build_parser, defaults  # noqa: E402
from guided_diffusion.fileio import atomic_write  # noqa: E402

# The command-line defaults (and the Evaluator's), from the flags' one home.
EVALUATOR_DEFAULTS = defaults(EvaluatorConfig)
# The fast-path flags the evaluators leave out: only --fast, the preset, is theirs.
FAST_FLAGS_LEFT_OUT = tuple(k for k in defaults(FastConfig) if k != "fast")
INCEPTION_SPLIT_SIZE = 5000
NHOOD_SIZES = (3,)  # k of the k-NN balls of improved precision/recall
PR_BATCH_SIZE = 10000  # rows x columns of one block of pairwise distances


class FIDStatistics:
    """
    Mean and covariance of Inception features: a Gaussian fit whose Frechet distance is FID.

    :param mu: the [D] mean.
    :param sigma: the [D x D] covariance.
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = mu
        self.sigma = sigma

    def frechet_distance(self, other: "FIDStatistics", eps: float = 1e-6) -> float:
        """
        ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))  (Heusel et al. 2017, eq. 6).

        As the original: if the matrix square root is not finite, retry with eps * I added to
        both covariances; a complex square root is accepted only when its diagonal is real up
        to 1e-3. Round-off can make the result of two near-equal fits slightly negative: that
        is clamped to 0. Equal covariances give ||mu1 - mu2||^2 exactly, without sqrtm.
        """
        mu1, sigma1 = np.atleast_1d(self.mu), np.atleast_2d(self.sigma)
        mu2, sigma2 = np.atleast_1d(other.mu), np.atleast_2d(other.sigma)
        if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
            raise ValueError(f"FID of statistics with different shapes: mu {mu1.shape} vs "
                             f"{mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
        diff = mu1 - mu2
        if np.array_equal(sigma1, sigma2):
            # sqrtm(S S) = S for a covariance S, so the trace term is exactly 0: skip the O(D^3)
            # square root (a minute for D = 2048 on a CPU), e.g. for a batch against itself.
            return float(diff.dot(diff))
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: sqrtm(sigma1 sigma2) is singular; adding {eps} to the diagonals")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"FID: sqrtm has an imaginary component of "
                                 f"{np.max(np.abs(covmean.imag))}")
            covmean = covmean.real
        fid = diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
        return float(max(fid, 0.0))


class RunningStatistics:
    """
    Mean and covariance of feature vectors that arrive in batches, without keeping them.

    float64 sums of each batch's centred products, merged by the pairwise update of Chan, Golub
    and LeVeque (1979): M2 = M2_a + M2_b + delta delta^T n_a n_b / n with delta the difference of
    the means. Unlike sum(x x^T) - n mu mu^T it does not cancel catastrophically when the
    features' mean is large against their spread.
    """

    def __init__(self):
        self.count = 0
        self.mean: np.ndarray | None = None  # [D] float64
        self.m2: np.ndarray | None = None  # [D x D] float64 sum of centred outer products

    def add(self, features: np.ndarray) -> None:
        """:param features: an [n x D] batch (any float dtype; summed in float64)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or (self.mean is not None and x.shape[1] != len(self.mean)):
            want = "[n x D]" if self.mean is None else f"[n x {len(self.mean)}]"
            raise ValueError(f"statistics need {want} feature batches, got shape {x.shape}")
        if len(x) == 0:
            return
        mean = x.mean(axis=0)
        centred = x - mean
        m2 = centred.T @ centred
        if self.count == 0:
            self.count, self.mean, self.m2 = len(x), mean, m2
            return
        total = self.count + len(x)
        delta = mean - self.mean
        self.mean = self.mean + delta * (len(x) / total)
        self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.count * len(x) / total)
        self.count = total

    def statistics(self) -> "FIDStatistics":
        """:return: the mean and unbiased (N - 1) covariance, as np.mean / np.cov give them."""
        if self.count < 2:
            raise ValueError(f"statistics need an [N x D] array with N >= 2, got {self.count} "
                             f"vectors")
        return FIDStatistics(self.mean.copy(), self.m2 / (self.count - 1))


def compute_statistics(activations: np.ndarray) -> FIDStatistics:
    """
    :param activations: an [N x D] array of features, N >= 2.
    :return: their mean and (unbiased, N - 1) covariance, as the original (np.mean, np.cov),
             in float64.
    """
    if activations.ndim != 2 or len(activations) < 2:
        raise ValueError(f"statistics need an [N x D] array with N >= 2, got shape "
                         f"{activations.shape}")
    running = RunningStatistics()
    running.add(activations)
    return running.statistics()


class RunningInceptionScore:
    """
    The Inception Score of class probabilities that arrive in batches, split by split: only the
    current split of split_size rows is held (5000 x 1008 float32 = 20 MB, as the original).

    :param split_size: rows per split; the last split may be shorter, as the original.
    """

    def __init__(self, split_size: int = INCEPTION_SPLIT_SIZE):
        self.split_size = split_size
        self.split_scores: list[float] = []
        self._part: list[np.ndarray] = []
        self._part_rows = 0

    def add(self, probs: np.ndarray) -> None:
        """:param probs: an [n x C] batch of class probabilities."""
        while len(probs):
            take = min(self.split_size - self._part_rows, len(probs))
            self._part.append(probs[:take])
            self._part_rows += take
            probs = probs[take:]
            if self._part_rows == self.split_size:
                self.split_scores.append(_split_score(np.concatenate(self._part)))
                self._part, self._part_rows = [], 0

    def score(self) -> float:
        """:return: the mean over splits of exp(E_x KL(p(y|x) || p(y)))."""
        scores = list(self.split_scores)
        if self._part_rows:
            scores.append(_split_score(np.concatenate(self._part)))
        if not scores:
            raise ValueError("the Inception Score needs at least one sample")
        return float(np.mean(scores))


def _split_score(part: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) of one split, p(y) its mean (Salimans et al. 2016)."""
    kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
    return np.exp(np.mean(np.sum(kl, axis=1)))


def inception_score(probs: np.ndarray, split_size: int = INCEPTION_SPLIT_SIZE) -> float:
    """
    exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), with p(y) the mean over each split of
    split_size samples, averaged over splits as the original does.

    :param probs: an [N x C] array of class probabilities (softmax of FIDInceptionV3 logits).
    """
    running = RunningInceptionScore(split_size)
    running.add(probs)
    return running.score()


def _default_device() -> th.device:
    return th.device("cuda" if th.cuda.is_available() else "cpu")


class ManifoldEstimator:
    """
    k-NN estimate of a feature manifold: the union of balls around each reference point whose
    radius is the distance to its k-th nearest neighbour (Kynkaanniemi et al. 2019, sec. 3).

    Distances are computed in row x column blocks so that an N x N matrix never sits in memory.
    Like the original, squared distances are computed in float16, and again in float32 for a
    block where float16 overflows.

    :param row_batch_size: rows of one block of distances.
    :param col_batch_size: columns of one block of distances.
    :param nhood_sizes: the k's; one radius (and one result) per k.
    :param clamp_to_percentile: if set, radii above this percentile are set to 0.
    :param eps: keeps the realism score finite at distance 0.
    :param device: where distances are computed (default: cuda when available).
    """

    def __init__(self, row_batch_size: int = PR_BATCH_SIZE, col_batch_size: int = PR_BATCH_SIZE,
                 nhood_sizes: tuple = NHOOD_SIZES, clamp_to_percentile: float | None = None,
                 eps: float = 1e-5, device: str | th.device | None = None):
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = tuple(nhood_sizes)
        self.num_nhoods = len(self.nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.eps = eps
        self.device = th.device(device) if device else _default_device()

    def pairwise_distances(self, u: th.Tensor, v: th.Tensor) -> th.Tensor:
        """
        :param u: an [N x D] float32 tensor; v: an [M x D] float32 tensor.
        :return: the [N x M] float32 squared distances, computed in float16 where they fit.
        """
        # Float16 arithmetic as the original's GPU graph does it: inputs and each intermediate
        # rounded to float16 (products accumulated in float32, like tensor-core matmuls).
        u16, v16 = u.half().float(), v.half().float()
        d16 = _squared_distances(
            (u16 * u16).sum(1).half(), (u16 @ v16.t()).half(), (v16 * v16).sum(1).half()
        )
        if th.isfinite(d16).all():
            return d16.float()
        return _squared_distances((u * u).sum(1), u @ v.t(), (v * v).sum(1))

    def _blocks(self, rows: th.Tensor, cols: th.Tensor):
        """Yield (row slice, column slice, distance block) over all pairs, a block at a time."""
        for r0 in range(0, len(rows), self.row_batch_size):
            rs = slice(r0, min(r0 + self.row_batch_size, len(rows)))
            for c0 in range(0, len(cols), self.col_batch_size):
                cs = slice(c0, min(c0 + self.col_batch_size, len(cols)))
                yield rs, cs, self.pairwise_distances(rows[rs], cols[cs])

    def _tensor(self, x: np.ndarray) -> th.Tensor:
        return th.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        """
        :param features: an [N x D] array.
        :return: an [N x len(nhood_sizes)] float32 array: each point's squared distance to its
                 k-th nearest other point (the point itself is its own 0-th neighbour).
        """
        k_max = max(self.nhood_sizes)
        if len(features) <= k_max:
            raise ValueError(f"precision/recall with k={k_max} need more than {k_max} feature "
                             f"vectors, got {len(features)}")
        f = self._tensor(features)
        nearest = th.empty(len(f), k_max + 1, device=self.device)
        for r0 in range(0, len(f), self.row_batch_size):
            best = None  # the k_max + 1 smallest distances of these rows seen so far
            for rs, cs, d in self._blocks(f[r0:r0 + self.row_batch_size], f):
                cand = d.topk(min(k_max + 1, d.shape[1]), dim=1, largest=False).values
                if best is not None:
                    cand = th.cat([best, cand], dim=1)
                best = cand.topk(min(k_max + 1, cand.shape[1]), dim=1, largest=False).values
            nearest[r0:r0 + len(best)] = best.sort(dim=1).values
        radii = nearest[:, list(self.nhood_sizes)].cpu().numpy()
        if self.clamp_to_percentile is not None:
            max_distances = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_distances] = 0
        return radii

    def evaluate(self, features: np.ndarray, radii: np.ndarray, eval_features: np.ndarray):
        """
        Which eval features lie on the manifold of `features`.

        :param features: the [N x D] reference features; radii: their [N x K] manifold_radii.
        :param eval_features: the [M x D] features to test.
        :return: ([M x K] int32 in-manifold flags, [M] max realism score radius/distance,
                 [M] index of the nearest reference feature).
        """
        f, r, e = self._tensor(features), self._tensor(radii), self._tensor(eval_features)
        inside = th.zeros(len(e), self.num_nhoods, dtype=th.bool, device=self.device)
        realism = th.full((len(e),), -float("inf"), device=self.device)
        nearest_d = th.full((len(e),), float("inf"), device=self.device)
        nearest = th.zeros(len(e), dtype=th.long, device=self.device)
        for rs, cs, d in self._blocks(e, f):
            for j in range(self.num_nhoods):
                inside[rs, j] |= (d <= r[cs, j][None]).any(dim=1)
            ratio = (r[cs, 0][None] / (d + self.eps)).max(dim=1).values
            realism[rs] = th.maximum(realism[rs], ratio)
            dmin, imin = d.min(dim=1)
            closer = dmin < nearest_d[rs]
            nearest[rs] = th.where(closer, imin + cs.start, nearest[rs])
            nearest_d[rs] = th.where(closer, dmin, nearest_d[rs])
        return inside.int().cpu().numpy(), realism.cpu().numpy(), nearest.cpu().numpy()

    def evaluate_pr(self, features_1: np.ndarray, radii_1: np.ndarray,
                    features_2: np.ndarray, radii_2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """
        :param features_1: the [N x D] reference features; radii_1: their radii.
        :param features_2: the [M x D] sample features; radii_2: their radii.
        :return: (precision, recall), each a [K] array: the share of samples inside the reference
                 manifold, and the share of references inside the sample manifold.
        """
        f1, r1 = self._tensor(features_1), self._tensor(radii_1)
        f2, r2 = self._tensor(features_2), self._tensor(radii_2)
        ref_inside = th.zeros(len(f1), self.num_nhoods, dtype=th.bool, device=self.device)
        sample_inside = th.zeros(len(f2), self.num_nhoods, dtype=th.bool, device=self.device)
        for rs, cs, d in self._blocks(f1, f2):
            for j in range(self.num_nhoods):
                ref_inside[rs, j] |= (d <= r2[cs, j][None]).any(dim=1)
                sample_inside[cs, j] |= (d <= r1[rs, j][:, None]).any(dim=0)
        return (sample_inside.double().mean(0).cpu().numpy(),
                ref_inside.double().mean(0).cpu().numpy())


def _squared_distances(norm_u: th.Tensor, dots: th.Tensor, norm_v: th.Tensor) -> th.Tensor:
    """||u||^2 - 2 u.v + ||v||^2 from the norms and dot products, floored at 0 against round-off."""
    return (norm_u[:, None] - 2 * dots + norm_v[None, :]).clamp_min(0)


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray,
                     device: str | th.device | None = None) -> tuple[float, float]:
    """
    Improved precision and recall (Kynkaanniemi et al. 2019) with k=3, as the original.

    :param ref_features: [N x D] pool features of the reference batch.
    :param sample_features: [M x D] pool features of the sample batch.
    :return: (precision, recall).
    """
    estimator = ManifoldEstimator(device=device)
    ref_radii = estimator.manifold_radii(ref_features)
    sample_radii = estimator.manifold_radii(sample_features)
    precision, recall = estimator.evaluate_pr(ref_features, ref_radii,
                                              sample_features, sample_radii)
    return float(precision[0]), float(recall[0])


@contextlib.contextmanager
def _full_float32():
    """Turn TF32 off on GPUs while computing features: the reference statistics are float32."""
    saved = th.backends.cuda.matmul.allow_tf32, th.backends.cudnn.allow_tf32
    th.backends.cuda.matmul.allow_tf32 = th.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        th.backends.cuda.matmul.allow_tf32, th.backends.cudnn.allow_tf32 = saved


@dataclass
class BatchSummary:
    """
    What the metrics need of one batch, gathered in one streaming pass over its images.

    :param num_images: N.
    :param pool: the [N x 2048] pool features, when kept: precision/recall compare every sample
                 with every reference, so they need the whole feature sets (8 KB per image).
    :param pool_stats: FID statistics of the pool features, when computed.
    :param spatial_stats: sFID statistics of the spatial features, when computed.
    :param inception_score: the Inception Score, when computed.
    """

    num_images: int
    pool: np.ndarray | None = None
    pool_stats: FIDStatistics | None = None
    spatial_stats: FIDStatistics | None = None
    inception_score: float | None = None


class Evaluator:
    """
    Inception features of .npz batches (or shard folders) and the metrics computed from them.

    :param model: a FIDInceptionV3 with its weights (see load_fid_inception()); its
                  `preprocessing` decides how images are resized and scaled.
    :param batch_size: images per forward pass.
    :param device: where the network runs (default: cuda when available).
    :param progress: show tqdm bars.
    :param fast: `--fast True`: the float32 switches of this device's preset (`fast_line` says
                 which).
    """

    def __init__(self, model: FIDInceptionV3, batch_size: int = EVALUATOR_DEFAULTS["batch_size"],
                 device: str | th.device | None = None, progress: bool = True,
                 fast: bool = False):
        self.device = th.device(device) if device else _default_device()
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.progress = progress
        self.fast_line = self._apply_fast_path() if fast else ""

    def _apply_fast_path(self) -> str:
        """
        Of the device's preset (`hardware.choose_switches`), turn on the one switch that keeps
        the features float32, as the reference statistics are (no bf16, fp16 or TF32):
        channels_last, oneDNN's and cuDNN's preferred convolution layout (CPU: 1.4x faster
        features, 2e-7 relative difference). :return: the log line saying what runs, and why.
        """
        facts = hardware.detect(self.device)
        channels_last = bool(hardware.choose_switches(facts)[0].get("channels_last"))
        if channels_last:
            self.model.to(memory_format=th.channels_last)
        return (f"fast path: {'channels_last' if channels_last else 'faithful'} "
                f"({facts.describe()}; the features stay float32)")

    @property
    def preprocessing(self) -> str:
        """'tf' or 'pytorch_fid': how the model resizes and scales images."""
        return self.model.preprocessing

    def iter_features(self, batches: Iterable[np.ndarray], total: int | None = None,
                      desc: str = "") -> Iterator[dict[str, np.ndarray]]:
        """
        :param batches: [n x H x W x 3] uint8 image batches.
        :return: per batch, a dict of float32 arrays 'pool' [n x 2048], 'spatial' [n x 2023] and
                 'logits' [n x 1008] (see FIDInceptionV3.features()).
        """
        with th.inference_mode(), _full_float32(), tqdm(total=total, desc=desc, unit="img",
                                                        disable=not self.progress) as bar:
            for batch in batches:
                feats = self.model.features(th.from_numpy(np.asarray(batch)).to(self.device))
                yield {k: v.cpu().numpy() for k, v in feats.items()}
                bar.update(len(batch))

    def compute_activations(self, batches: Iterable[np.ndarray], total: int | None = None,
                            desc: str = "") -> tuple[np.ndarray, np.ndarray]:
        """
        :param batches: [n x H x W x 3] uint8 image batches.
        :return: (pool [N x 2048], spatial [N x 2023]) float32 features.
        """
        pool, spatial = [], []
        for feats in self.iter_features(batches, total=total, desc=desc):
            pool.append(feats["pool"])
            spatial.append(feats["spatial"])
        return np.concatenate(pool), np.concatenate(spatial)

    def read_activations(self, path: str, min_images: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """Features of `arr_0` of an .npz batch or shard folder, batch_size images at a time."""
        with open_image_batch(path, min_images=min_images) as reader:
            acts = self.compute_activations(reader.batches(self.batch_size), total=len(reader),
                                            desc=os.path.basename(path))
        for name, a in zip(("pool", "spatial"), acts):
            _check_finite(path, name, a)
        return acts

    def summarize(self, path: str, statistics: bool = True, inception_score: bool = False,
                  keep_pool: bool = True, min_images: int = 2,
                  split_size: int = INCEPTION_SPLIT_SIZE) -> BatchSummary:
        """
        One streaming pass over a batch's images: only batch_size images, the running sums and
        (for the Inception Score) one split of probabilities are held, plus the pool features
        when keep_pool.

        :param path: an .npz batch or a shard folder.
        :param statistics: compute the FID and sFID statistics.
        :param inception_score: compute the Inception Score over splits of split_size.
        :param keep_pool: keep the [N x 2048] pool features (for precision/recall).
        :param min_images: the fewest images accepted.
        """
        pool, pool_stats, spatial_stats = [], RunningStatistics(), RunningStatistics()
        score = RunningInceptionScore(split_size)
        with open_image_batch(path, min_images=min_images) as reader:
            for feats in self.iter_features(reader.batches(self.batch_size), total=len(reader),
                                            desc=os.path.basename(path)):
                for name in ("pool", "spatial"):
                    _check_finite(path, name, feats[name])
                if keep_pool:
                    pool.append(feats["pool"])
                if statistics:
                    pool_stats.add(feats["pool"])
                    spatial_stats.add(feats["spatial"])
                if inception_score:
                    score.add(_softmax(feats["logits"]))
            num_images = len(reader)
        return BatchSummary(
            num_images=num_images,
            pool=np.concatenate(pool) if keep_pool else None,
            pool_stats=pool_stats.statistics() if statistics else None,
            spatial_stats=spatial_stats.statistics() if statistics else None,
            inception_score=score.score() if inception_score else None,
        )

    def read_statistics(self, path: str, activations: tuple[np.ndarray, np.ndarray]
                        ) -> tuple[FIDStatistics, FIDStatistics]:
        """
        :return: (pool, spatial) statistics: the file's precomputed mu/sigma and mu_s/sigma_s
                 when it has them (as the original), else computed from `activations`.
        """
        stats = read_precomputed_statistics(path)
        if stats is not None:
            return (FIDStatistics(stats["mu"], stats["sigma"]),
                    FIDStatistics(stats["mu_s"], stats["sigma_s"]))
        return compute_statistics(activations[0]), compute_statistics(activations[1])

    def compute_probs(self, pool: np.ndarray) -> np.ndarray:
        """
        :return: [N x 1008] softmax of the logits of [N x 2048] pool features (bias-free, as the
                 original).
        """
        w = self.model.fc.weight.detach().to(self.device, th.float32)
        with th.inference_mode(), _full_float32():
            logits = [(th.as_tensor(p, device=self.device) @ w.t()).cpu().numpy()
                      for p in np.array_split(pool, max(1, len(pool) // 4096))]
        return _softmax(np.concatenate(logits))

    def compute_inception_score(self, pool: np.ndarray,
                                split_size: int = INCEPTION_SPLIT_SIZE) -> float:
        return inception_score(self.compute_probs(pool), split_size=split_size)

    def compute_prec_recall(self, ref_pool: np.ndarray,
                            sample_pool: np.ndarray) -> tuple[float, float]:
        return precision_recall(ref_pool, sample_pool, device=self.device)

    def evaluate(self, ref_batch: str, sample_batch: str) -> dict[str, float]:
        """
        The original's five metrics of sample_batch against ref_batch (.npz files or shard
        folders), one streaming pass over each. A batch's precomputed mu/sigma/mu_s/sigma_s are
        used when present (as the original); its statistics are computed only when absent.

        :return: a dict with 'inception_score', 'fid', 'sfid', 'precision', 'recall'.
        """
        min_images = max(NHOOD_SIZES) + 1  # k-NN radii need k other points
        # Both batches checked before any work: readable, uint8 RGB, enough images, one size.
        sizes = {}
        for path in (ref_batch, sample_batch):
            with open_image_batch(path, min_images=min_images) as reader:
                sizes[path] = tuple(reader.shape[1:3])
        if sizes[ref_batch] != sizes[sample_batch]:
            (h, w), (h2, w2) = sizes[ref_batch], sizes[sample_batch]
            raise ValueError(f"{ref_batch}: reference images are {h}x{w} px, the samples in "
                             f"{sample_batch} {h2}x{w2} px; the metrics compare images of one "
                             "size: make the reference batch at the samples' size")
        summaries, stats = {}, {}
        for role, path in (("ref", ref_batch), ("sample", sample_batch)):
            precomputed = read_precomputed_statistics(path)
            made_with = precomputed is not None and statistics_preprocessing(path)
            if made_with and made_with != self.preprocessing:
                warnings.warn(f"{path}: its precomputed statistics were made with {made_with!r} "
                              f"preprocessing, these features with {self.preprocessing!r}; "
                              f"FID/sFID compare differently resized images (use {made_with!r})")
            summaries[role] = summary = self.summarize(
                path, statistics=precomputed is None, inception_score=role == "sample",
                min_images=min_images)
            if precomputed is None:
                stats[role] = summary.pool_stats, summary.spatial_stats
            else:
                stats[role] = (FIDStatistics(precomputed["mu"], precomputed["sigma"]),
                               FIDStatistics(precomputed["mu_s"], precomputed["sigma_s"]))
        ref, sample = summaries["ref"], summaries["sample"]
        precision, recall = self.compute_prec_recall(ref.pool, sample.pool)
        return {
            "inception_score": sample.inception_score,
            "fid": stats["sample"][0].frechet_distance(stats["ref"][0]),
            "sfid": stats["sample"][1].frechet_distance(stats["ref"][1]),
            "precision": precision,
            "recall": recall,
        }


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float32 (through torch, as the features are made)."""
    return th.softmax(th.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), dim=1).numpy()


def _check_finite(path: str, name: str, features: np.ndarray) -> None:
    if not np.isfinite(features).all():
        raise ValueError(f"{path}: Inception {name} features contain NaN/inf (bad weights file?)")


METRIC_LABELS = dict(inception_score="Inception Score", fid="FID", sfid="sFID",
                     precision="Precision", recall="Recall")


def create_argparser() -> argparse.ArgumentParser:
    parser = build_parser(__doc__.split("\n\n")[1], EvaluatorConfig, FastConfig,
                          drop=FAST_FLAGS_LEFT_OUT)
    parser.add_argument("ref_batch", help="reference .npz (arr_0 images, optional mu/sigma/mu_s/"
                                          "sigma_s) or shard folder")
    parser.add_argument("sample_batch", help="sample .npz (arr_0 images) or shard folder "
                                             "(manifest.json + samples_START-STOP.npz)")
    return parser


def checked_device(name: str) -> th.device:
    """`--device` as a torch device that exists here (a ValueError naming the flag if not)."""
    try:
        device = th.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and (not th.cuda.is_available()
                                  or (device.index or 0) >= th.cuda.device_count()):
        raise ValueError(f"--device {name}: this machine has {th.cuda.device_count()} CUDA "
                         "device(s); use --device cpu")
    return device


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = create_argparser().parse_args(argv)
    device = checked_device(args.device) if args.device else _default_device()
    model = load_fid_inception(args.inception_path or None, device=device,
                               preprocessing=args.preprocessing)
    evaluator = Evaluator(model, batch_size=args.batch_size, device=device, fast=args.fast)
    if evaluator.fast_line:
        print(evaluator.fast_line)
    metrics = evaluator.evaluate(args.ref_batch, args.sample_batch)
    # The header says how the features were made: numbers from different preprocessings differ.
    print(f"Computing evaluations (Inception preprocessing: {args.preprocessing})...")
    for key, label in METRIC_LABELS.items():
        print(f"{label}: {metrics[key]}")
    if args.output:

        record = dict(metrics, preprocessing=args.preprocessing, ref_batch=args.ref_batch,
                      sample_batch=args.sample_batch)
        atomic_write(args.output, lambda f: f.write(json.dumps(record, indent=2).encode()))
    return metrics


if __name__ == "__main__":
    run_main(main, "evaluator.py")
