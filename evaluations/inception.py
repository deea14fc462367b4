"""
The FID Inception-v3 network in PyTorch, and where its weights come from.

FID, sFID and the Inception Score of the paper were computed with the 2015-12-05 TensorFlow
Inception graph (Heusel et al. 2017 for FID; Nash et al. 2021 for sFID; Salimans et al. 2016 for
IS). pytorch-fid ported that graph to a torchvision-style module and released its weights as
`pt_inception-2015-12-05-6726825d.pth`. This module rebuilds the same layers under the same
state_dict names, so that file loads with strict=True, and exposes the three feature sets that
the original evaluator reads from the graph.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.config import (  # the flags' one home
    INCEPTION_WEIGHTS_ENV_VAR,
    PREPROCESSING_MODES,
    EvaluatorConfig,
)

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch-hub style: the file name carries its hash prefix
WEIGHTS_ENV_VAR = INCEPTION_WEIGHTS_ENV_VAR
INPUT_SIZE = 299
# 'tf': the original's reference statistics (mu, sigma, mu_s, sigma_s) were made by the TF graph,
# so sample features must be made the same way to be compared with them.
DEFAULT_PREPROCESSING = EvaluatorConfig().preprocessing
NUM_SPATIAL_CHANNELS = 7  # the original's sFID keeps mixed_6/conv[..., :7]: 17 * 17 * 7 = 2023


class BasicConv2d(nn.Module):
    """
    The unit every Inception-v3 layer is made of: conv without bias, BatchNorm, ReLU.
    eps=1e-3 is the TF graph's batch-norm epsilon.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: th.Tensor) -> th.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: th.Tensor) -> th.Tensor:
    # The TF graph averages only over real pixels at the border (TF "SAME" padding), hence
    # count_include_pad=False. torchvision's Inception counts the zero padding: the main
    # difference between the FID blocks and torchvision's.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_3x3(x: th.Tensor) -> th.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _Mixed(nn.Module):
    """A block whose output is the channel concatenation of parallel branches."""

    def branches(self, x: th.Tensor) -> list[th.Tensor]:
        raise NotImplementedError

    def forward(self, x: th.Tensor) -> th.Tensor:
        return th.cat(self.branches(x), dim=1)


class FIDInceptionA(_Mixed):
    """35x35 block (Mixed_5b/5c/5d): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def branches(self, x):
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ]


class InceptionB(_Mixed):
    """Reduction 35x35 -> 17x17 (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def branches(self, x):
        return [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]


class FIDInceptionC(_Mixed):
    """17x17 block (Mixed_6b..6e): 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def branches(self, x):
        dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = conv(dbl)
        return [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool_3x3(x)),
        ]


class InceptionD(_Mixed):
    """Reduction 17x17 -> 8x8 (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def branches(self, x):
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                     self.branch7x7x3_4):
            b7 = conv(b7)
        return [
            self.branch3x3_2(self.branch3x3_1(x)),
            b7,
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]


class FIDInceptionE(_Mixed):
    """
    8x8 block (Mixed_7b, Mixed_7c) with 1x3 / 3x1 branches side by side.

    :param pool: 'avg' for Mixed_7b; 'max' for Mixed_7c, where the TF graph pools with max
                 (a quirk of the 2015 graph that pytorch-fid keeps, and so do we).
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        assert pool in ("avg", "max"), pool
        self.pool = _avg_pool_3x3 if pool == "avg" else _max_pool_3x3
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def branches(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [
            self.branch1x1(x),
            self.branch3x3_2a(b3),
            self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl),
            self.branch3x3dbl_3b(dbl),
            self.branch_pool(self.pool(x)),
        ]


class FIDInceptionV3(nn.Module):
    """
    Inception-v3 as in the 2015-12-05 TF graph (pytorch-fid's port): FID blocks, a 1008-way fc
    (the graph's 1000 ImageNet classes plus 8 unused), no auxiliary head.

    Its state_dict matches `pt_inception-2015-12-05-6726825d.pth` name for name. Build it with
    `load_fid_inception()` to get the weights; a bare `FIDInceptionV3()` is randomly initialised.
    """

    # The blocks after the stem, in order. Mixed_6d is the TF graph's `mixed_6`, whose 1x1
    # branch (`mixed_6/conv`) gives the sFID features.
    MIXED = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
             "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")
    SPATIAL_BLOCK = "Mixed_6d"

    def __init__(self, preprocessing: str = DEFAULT_PREPROCESSING):
        """:param preprocessing: 'tf' or 'pytorch_fid', how images become input; see preprocess()"""
        super().__init__()
        if preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"preprocessing={preprocessing!r}; expected one of "
                             f"{PREPROCESSING_MODES}")
        self.preprocessing = preprocessing
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def preprocess(self, images: th.Tensor) -> th.Tensor:
        """
        Map NHWC pixels in [0, 255] to the network's NCHW input in [-1, 1] at 299x299.

        'tf' (default): as the TF graph the original evaluator runs: TF1 ResizeBilinear
        (align_corners=False, half_pixel_centers=False), which samples at x * in/out without the
        half-pixel shift, on [0, 255], then (x - 128) / 128. Checked against TensorFlow's
        legacy resize: max difference 2.4e-7. The original's reference statistics were made
        this way, so only these sample features are comparable with them.
        'pytorch_fid': as pytorch-fid's port, scale to [0, 1], bilinear resize with
        align_corners=False (half-pixel centres), then 2x - 1. Its inputs differ from 'tf' at
        every size: by the resize wherever images are not 299x299, and by the scaling
        ((x - 127.5) / 127.5 vs (x - 128) / 128) even at 299x299.

        :param images: an [N x H x W x 3] tensor (uint8 or float) of pixel values in [0, 255].
        :return: an [N x 3 x 299 x 299] float32 tensor.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected [N x H x W x 3] images, got shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).to(th.float32)
        resize = x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE)
        if self.preprocessing == "tf":
            if resize:
                rows = _tf1_bilinear_matrix(x.shape[-2], INPUT_SIZE, x.device)
                cols = _tf1_bilinear_matrix(x.shape[-1], INPUT_SIZE, x.device)
                x = th.einsum("oh,nchw,pw->ncop", rows, x, cols)
            return (x - 128) / 128
        x = x / 255.0
        if resize:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False)
        return 2 * x - 1

    def features(self, images: th.Tensor) -> dict[str, th.Tensor]:
        """
        Compute the features the original evaluator reads from the TF graph.

        :param images: an [N x H x W x 3] tensor of pixels in [0, 255], any H and W.
        :return: a dict with
                 'pool': [N x 2048] `pool_3` features (FID, precision, recall);
                 'spatial': [N x 2023] the first 7 channels of `mixed_6/conv` (Mixed_6d's 1x1
                            branch, after its ReLU), flattened in H, W, C order as the TF graph
                            lays them out (sFID; the reference batches' mu_s/sigma_s use it);
                 'logits': [N x 1008] pool @ fc.weight^T. Like the original (and improved-GAN's
                           Inception Score code it follows), the fc *bias is not added*: softmax
                           of these logits is what the published Inception Scores used.
        """
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        spatial = None
        for name in self.MIXED:
            parts = getattr(self, name).branches(x)
            if name == self.SPATIAL_BLOCK:
                # NCHW -> NHWC before flattening: TF stores activations channels-last.
                spatial = parts[0][:, :NUM_SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
            x = th.cat(parts, dim=1)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = pool @ self.fc.weight.t()
        return dict(pool=pool, spatial=spatial, logits=logits)

    def forward(self, images: th.Tensor) -> dict[str, th.Tensor]:
        return self.features(images)


def _tf1_bilinear_matrix(in_size: int, out_size: int, device) -> th.Tensor:
    """
    The [out_size x in_size] matrix of TF1's ResizeBilinear (align_corners=False, no half-pixel
    centres) along one axis: output i samples input position i * (in / out) in float32, blending
    its floor and the next pixel (clamped at the last one).
    """
    src = th.arange(out_size, dtype=th.float32) * th.tensor(in_size / out_size, dtype=th.float32)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo.float()
    out = th.arange(out_size)
    matrix = th.zeros(out_size, in_size)
    matrix.index_put_((out, lo), 1 - frac, accumulate=True)
    matrix.index_put_((out, hi), frac, accumulate=True)
    return matrix.to(device)


def default_weights_path() -> str:
    """Where the weights are cached: $XDG_CACHE_HOME (or ~/.cache)/guided_diffusion/."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "guided_diffusion", WEIGHTS_FILENAME)


def _download(url: str, dest: str) -> None:
    """Download url to dest atomically, checking the hash prefix that the file name carries."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
        if not digest.hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
            raise OSError(f"downloaded {url} but its sha256 {digest.hexdigest()[:8]}... does not "
                          f"start with {WEIGHTS_SHA256_PREFIX}")
        shutil.move(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def resolve_weights_path(path: str | None = None, download: bool = True) -> str:
    """
    Find the Inception weights: `path` if given, else ${GD_INCEPTION_PATH}, else the cache
    (downloading into it when online).

    :raises FileNotFoundError: naming the places looked at and where to put the file.
    """
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception_path {path!r} does not exist; download "
                                    f"{WEIGHTS_URL}")
        return path
    env = os.environ.get(WEIGHTS_ENV_VAR)
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"${WEIGHTS_ENV_VAR}={env!r} does not exist; download "
                                    f"{WEIGHTS_URL}")
        return env
    cached = default_weights_path()
    if os.path.isfile(cached):
        return cached
    if download:
        try:
            _download(WEIGHTS_URL, cached)
            return cached
        except (urllib.error.URLError, OSError) as e:
            reason = f"downloading failed ({e})"
    else:
        reason = "downloading is disabled"
    raise FileNotFoundError(
        f"FID Inception weights not found and {reason}. Download {WEIGHTS_URL} and either put "
        f"it at {cached}, pass --inception_path FILE, or set {WEIGHTS_ENV_VAR}=FILE."
    )


def load_fid_inception(path: str | None = None, device: str | th.device = "cpu",
                       download: bool = True,
                       preprocessing: str = DEFAULT_PREPROCESSING) -> FIDInceptionV3:
    """
    Build FIDInceptionV3 with the pytorch-fid weights, in eval mode on `device`.

    :param path: the weights file; None looks at ${GD_INCEPTION_PATH} and the cache, see
                 resolve_weights_path().
    :param preprocessing: 'tf' or 'pytorch_fid', see FIDInceptionV3.preprocess().
    """
    path = resolve_weights_path(path, download=download)
    try:
        state = th.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise ValueError(f"{path}: not a loadable weights file ({type(e).__name__}: {e})") from e
    model = FIDInceptionV3(preprocessing)
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in want.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: has {len(state)} tensors, FIDInceptionV3 {len(want)}; missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]} (is it {WEIGHTS_FILENAME}?)"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
