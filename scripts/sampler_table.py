"""
Quality table of samplers and guidance on the digits quickstart (Table 4 of Dhariwal & Nichol 2021).

For each row (sampler, steps, CFG weight, classifier scale) this samples `--num_samples` digits of
requested classes 0..9 (balanced) from one diffusion model, from the same x_T for every row, and
reports:

- toy FID: the Frechet distance between Gaussian fits of the samples and of the real training
  digits, in the 64-d pixel space of 8x8 images (16 px samples are averaged over channels and 2x2
  blocks; the real digits take the same bicubic-up / average-down round trip). With a few hundred
  samples it carries a small-sample bias: the `real (val)` row shows the floor, 250 held-out digits;
- judged accuracy: how often a "judge" classifier trained on *clean* 8x8 digits (an MLP, not the
  noisy guidance classifier) recognises the requested class;
- coverage: exp(entropy of the judged-class histogram) / 10 (1 = all classes equally often);
- NFE and wall-clock seconds per sample.

`--model_path` is a diffusion model trained with `--class_cond True --class_dropout_prob > 0`
(CFG weight 0 = its unconditional branch, 1 = conditional), `--classifier_path` the noisy
classifier for classifier guidance, `--cm_model_path` a consistency student of the model
(cm_distill.py) for rows `consistency:K:1:0` (K-step consistency sampling). Their flags are
read from the `args.json` the training scripts write beside the checkpoints; flags given here
override them. Writes `{out_dir}/sampler_table.md`,
`sampler_table.json`, a PNG grid per row and, with matplotlib installed
(`pip install -e .[plot]`), `sampler_table_fid.png` (FID against NFE). `--dit_path` adds a second
model's rows (`--dit_rows`), e.g. a `--model dit` run beside the U-Net, labelled by its size.

    python scripts/sampler_table.py --model_path RUN/ema_0.995_002500.pt \\
        --classifier_path CLF/model001499.pt --out_dir runs/table --num_samples 250
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch as th
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from datasets.digits import digit_to_image, load_digits  # noqa: E402
from evaluations.evaluator import FIDStatistics, compute_statistics  # noqa: E402
from guided_diffusion import cli, samplers, sample_util  # noqa: E402
from guided_diffusion.guidance import classifier_cond_fn  # noqa: E402
from guided_diffusion.config import (  # noqa: E402
    ClassifierConfig,
    CommonConfig,
    DiffusionConfig,
    DiTConfig,
    GuidanceConfig,
    SampleConfig,
    SamplerOptions,
    SamplerTableConfig,
    SPACINGS,
    UNetConfig,
    add_flags,
    build_parser,
    defaults,
    flag_fields,
)
from guided_diffusion.script_util import (  # noqa: E402
    classifier_and_diffusion_defaults,
    model_and_diffusion_defaults,
)


# ------------------------------------------------------------------------------------------------
# Digits in the 8x8 evaluation space


def to_eval_space(images: th.Tensor) -> th.Tensor:
    """[N x C x 16 x 16] in [-1, 1] -> [N x 64]: channel mean, then 2x2 block averages."""
    gray = images.float().clamp(-1, 1).mean(dim=1, keepdim=True)
    return F.avg_pool2d(gray, images.shape[-1] // 8).flatten(1)


def real_digits(image_size: int) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """
    The real digits as the model saw them (bicubic to `image_size`, [-1, 1]) in eval space.

    :return: (features [1797 x 64], labels [1797], is_val [1797] bool: every 6th digit, as
        datasets/digits.py holds it out).
    """
    images, labels = load_digits()
    ups = np.stack([np.asarray(digit_to_image(d, image_size), dtype=np.float32) for d in images])
    x = th.from_numpy(ups / 127.5 - 1.0)[:, None]
    is_val = th.arange(len(labels)) % 6 == 0
    return to_eval_space(x), th.from_numpy(labels), is_val


class Judge(nn.Module):
    """A small MLP on clean 8x8 digits that judges which class a sample shows."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(256, 10),
        )

    def forward(self, x):
        return self.net(x)


def train_judge(feats: th.Tensor, labels: th.Tensor, is_val: th.Tensor, path: str) -> Judge:
    """Train (or load the cached) judge on the training digits; print its held-out accuracy."""
    judge = Judge()
    if os.path.exists(path):
        judge.load_state_dict(th.load(path, map_location="cpu", weights_only=True))
        return judge.eval()
    gen = th.Generator().manual_seed(0)
    th.manual_seed(0)
    opt = th.optim.Adam(judge.parameters(), lr=1e-3, weight_decay=1e-4)
    x_tr, y_tr = feats[~is_val], labels[~is_val]
    for _ in range(400):  # full-batch epochs with small shifts of ink intensity as augmentation
        scale = 1 + 0.1 * th.randn(len(x_tr), 1, generator=gen)
        loss = F.cross_entropy(judge((x_tr + 1) * scale - 1), y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    judge.eval()
    with th.no_grad():
        acc = (judge(feats[is_val]).argmax(1) == labels[is_val]).float().mean().item()
    print(f"judge: held-out accuracy {acc:.3f} on {int(is_val.sum())} real digits")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    th.save(judge.state_dict(), path)
    return judge


def gaussian_fit(feats: th.Tensor) -> FIDStatistics:
    """The evaluator's Gaussian fit (mean, unbiased covariance) of [N x D] features."""
    return compute_statistics(feats.double().numpy())


def frechet_distance(fit1: FIDStatistics, fit2: FIDStatistics) -> float:
    """The evaluator's Frechet distance (FID's formula) between two fits."""
    return fit1.frechet_distance(fit2)


def judge_metrics(judge: Judge, feats: th.Tensor, requested: th.Tensor) -> tuple[float, float]:
    """:return: (accuracy of the requested class, coverage = exp(H(judged classes)) / 10)."""
    with th.no_grad():
        judged = judge(feats).argmax(1)
    acc = (judged == requested).float().mean().item()
    p = th.bincount(judged, minlength=10).double() / len(judged)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return acc, math.exp(entropy) / 10


# ------------------------------------------------------------------------------------------------
# Models


def flags_for(kind_defaults: dict, checkpoint: str, explicit: dict) -> argparse.Namespace:
    """Defaults <- args.json beside the checkpoint <- flags given on the command line."""
    flags = dict(kind_defaults)
    saved = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "args.json")
    if os.path.exists(saved):
        with open(saved) as f:
            flags.update({k: v for k, v in json.load(f).items() if k in kind_defaults})
    flags.update({k: v for k, v in explicit.items() if k in kind_defaults})
    return argparse.Namespace(**flags)


def parse_rows(spec: str, spacing: str) -> list[tuple[str, int, float, float, str]]:
    """`--rows`: sampler:steps:cfg_scale:classifier_scale[:spacing] (default `spacing`)."""
    rows = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if (len(parts) not in (4, 5) or parts[0] not in samplers.SAMPLER_NAMES
                or parts[4:] and parts[4] not in SPACINGS):
            raise cli.ScriptError(
                f"--rows entry {item!r}: expected sampler:steps:cfg_scale:classifier_scale"
                f"[:spacing] with a sampler in {', '.join(samplers.SAMPLER_NAMES)} and a spacing "
                f"in {', '.join(SPACINGS)}")
        rows.append((parts[0], int(parts[1]), float(parts[2]), float(parts[3]),
                     samplers.spacing_for(parts[0], parts[4] if len(parts) == 5 else spacing)))
    return rows


def row_label(sampler: str, steps: int, cfg: float, clf: float) -> str:
    if clf:
        guide = f"classifier s={clf:g}" + (f" + CFG w={cfg:g}" if cfg else " (uncond.)")
    elif cfg == 1:
        guide = "none (cond.)"
    elif cfg == 0:
        guide = "none (uncond.)"
    else:
        guide = f"CFG w={cfg:g}"
    return guide


def save_grid(samples: th.Tensor, labels: th.Tensor, path: str) -> None:
    from PIL import Image

    arr = sample_util.to_uint8_nhwc(samples.float()).numpy()
    per_class = [np.flatnonzero(labels.numpy() == c)[:10] for c in range(10)]
    pick = np.concatenate(per_class)
    grid = sample_util.image_grid(arr[pick], labels.numpy()[pick], max_images=len(pick),
                                  min_tile=32)
    Image.fromarray(grid).save(path)


def plot_fid(results: list[dict], floor: float, path: str) -> bool:
    """
    FID against NFE for the unguided conditional rows, one line per sampler (matplotlib, the
    optional `plot` extra). :return: whether the plot was written.
    """
    pts = [r for r in results if r["cfg_scale"] == 1 and r["classifier_scale"] == 0]
    if not pts:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[plot]): no sampler_table_fid.png")
        return False
    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    # One line per sampler and spacing (colour = spacing, line style = sampler); a single point
    # (DDPM-250) is a marker.
    colours = {"logsnr": "tab:orange", "uniform": "tab:green", "karras": "tab:purple",
               "edm": "tab:blue", "training grid": "black"}
    for name, spacing in dict.fromkeys((r["sampler"], r.get("spacing", "")) for r in pts):
        line = sorted((r["nfe"], r["fid"]) for r in pts
                      if r["sampler"] == name and r.get("spacing", "") == spacing)
        style = {"ddim": "-", "dpm++2m": "--", "dpm++3m": ":", "unipc": "-."}.get(name, "-")
        label = name if name in ("ddpm", "consistency") else f"{name} ({spacing})"
        colour = "tab:red" if name == "ddpm" else colours.get(spacing)
        ax.plot(*zip(*line), marker="o", markersize=3, linestyle=style, color=colour,
                label=label)
    ax.axhline(floor, color="gray", linestyle="--", label="real (val) floor")
    ax.set_xscale("log")
    ax.set_yscale("log")  # few-step rows reach FID ~2, the good ones sit near the floor
    ax.set_xlabel("NFE")
    ax.set_ylabel("toy FID (8x8 pixels)")
    ax.set_title("conditional, no guidance")
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------


def main():
    args = create_argparser().parse_args()
    th.set_num_threads(args.threads)
    explicit = {k: getattr(args, k) for k in MODEL_FLAGS if hasattr(args, k)}
    rows = parse_rows(args.rows, args.sampler_spacing)

    cli.require_path(args.model_path, "model_path")
    # U-Net or DiT (--model in args.json): the image model's flags and DiT's.
    image_model_defaults = {**model_and_diffusion_defaults(), **defaults(DiTConfig)}
    margs = flags_for(image_model_defaults, args.model_path, explicit)
    margs.model_path, margs.use_fp16 = args.model_path, False
    model, diffusion = cli.load_model_and_diffusion(margs, "unet")
    networks = [("", model, diffusion, rows)]
    if args.dit_path:  # a second model beside the first, from its own args.json only
        cli.require_path(args.dit_path, "dit_path")
        dargs = flags_for(image_model_defaults, args.dit_path, {})
        dargs.model_path, dargs.use_fp16 = args.dit_path, False
        if dargs.image_size != margs.image_size:
            raise cli.ScriptError(f"--dit_path: image size {dargs.image_size}, the table's model "
                                  f"{margs.image_size}")
        dit, dit_diffusion = cli.load_model_and_diffusion(dargs, "unet")
        name = (f" (DiT depth {len(dit.blocks)}, width {dit.hidden_size}, patch {dit.patch_size})"
                if dargs.model == "dit" else " (2nd model)")
        dit_rows = parse_rows(args.dit_rows, args.sampler_spacing)
        networks.append((name, dit, dit_diffusion, dit_rows))
    classifier = None
    if any(r[3] for r in rows):
        cli.require_path(args.classifier_path, "classifier_path")
        cargs = flags_for(classifier_and_diffusion_defaults(), args.classifier_path, explicit)
        cargs.classifier_path, cargs.classifier_use_fp16 = args.classifier_path, False
        classifier, _ = cli.load_model_and_diffusion(cargs, "classifier")

    # The "consistency" rows sample a consistency student of the model (cm_distill.py).
    student, cm_grid = None, None
    if any(r[0] == "consistency" for r in rows):
        cli.require_path(args.cm_model_path, "cm_model_path")
        sample_util.check_sampler_fits_model(
            argparse.Namespace(sampler="consistency", model_path=args.cm_model_path))
        sargs = flags_for(model_and_diffusion_defaults(), args.cm_model_path, explicit)
        sargs.model_path, sargs.use_fp16 = args.cm_model_path, False
        student, _ = cli.load_model_and_diffusion(sargs, "unet")
        cm_grid = sample_util.consistency_grid(args.cm_model_path, diffusion)

    os.makedirs(args.out_dir, exist_ok=True)
    feats, labels, is_val = real_digits(margs.image_size)
    judge = train_judge(feats, labels, is_val, args.judge_path or
                        os.path.join(args.out_dir, "judge.pt"))
    ref = gaussian_fit(feats[~is_val])
    val_feats, val_labels = feats[is_val][: args.num_samples], labels[is_val][: args.num_samples]
    floor = frechet_distance(gaussian_fit(val_feats), ref)
    floor_acc, floor_cov = judge_metrics(judge, val_feats, val_labels)
    print(f"real (val), {len(val_feats)} digits: toy FID {floor:.3f}, judged accuracy "
          f"{floor_acc:.3f}, coverage {floor_cov:.3f}")

    n, size = args.num_samples, margs.image_size
    requested = th.arange(n) % 10
    x_T = th.randn(n, 3, size, size, generator=th.Generator().manual_seed(args.seed))
    results = []
    for suffix, model, diffusion, sampler, steps, cfg, clf, spacing in (
            (suffix, m, d, *row) for suffix, m, d, net_rows in networks for row in net_rows):
        out = []
        th.manual_seed(args.seed + 1)  # DDPM's step noise: the same for every DDPM row
        start = time.time()
        for b in range(0, n, args.batch_size):
            y = requested[b:b + args.batch_size]
            out.append(samplers.sample(
                diffusion, student if sampler == "consistency" else model,
                tuple(x_T[b:b + args.batch_size].shape),
                noise=x_T[b:b + args.batch_size], clip_denoised=args.clip_denoised,
                cond_fn=classifier_cond_fn(classifier, clf) if clf else None,
                model_kwargs={"y": y}, device="cpu", sampler=sampler, steps=steps,
                sampler_spacing=spacing, sigma_max=args.sigma_max, rho=args.rho,
                sigma_min=args.sigma_min,
                cfg_scale=cfg, cm_grid=cm_grid if sampler == "consistency" else None))
        seconds = (time.time() - start) / n
        samples = th.cat(out)
        sfeats = to_eval_space(samples)
        acc, cov = judge_metrics(judge, sfeats, requested)
        nfe = samplers.nfe(sampler, steps) * (1 if cfg in (0.0, 1.0) else 2)
        res = dict(sampler=sampler + suffix, steps=steps, nfe=nfe, cfg_scale=cfg,
                   classifier_scale=clf,
                   # consistency levels come from the student's training grid, not a spacing
                   spacing="training grid" if sampler == "consistency" else spacing,
                   guidance=row_label(sampler, steps, cfg, clf),
                   fid=frechet_distance(gaussian_fit(sfeats), ref), accuracy=acc, coverage=cov,
                   seconds_per_sample=seconds)
        results.append(res)
        tag = f"{sampler}{steps}_{spacing}_cfg{cfg:g}_clf{clf:g}" + ("_2nd" if suffix else "")
        save_grid(samples, requested, os.path.join(args.out_dir, f"grid_{tag}.png"))
        print(f"{sampler + suffix:>8} {steps:>4} steps {res['spacing']:>7}  NFE {nfe:>4}  "
              f"{res['guidance']:<22} "
              f"FID {res['fid']:7.3f}  acc {acc:.3f}  cov {cov:.3f}  {seconds:.3f} s/sample",
              flush=True)

    lines = [
        f"Digits quickstart, {n} samples per row (classes 0-9 balanced, same x_T in every row), "
        f"steps spaced as the spacing column says. Toy FID in the 64-d pixel "
        f"space of 8x8 images against the {int((~is_val).sum())} training digits; accuracy and "
        f"coverage judged by an MLP trained on clean digits. NFE counts network evaluations per "
        f"sample (a CFG forward of the doubled batch counts twice).",
        "",
        "| sampler | steps | spacing | NFE | guidance | toy FID | judged acc. | coverage | s/sample |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|",
        f"| real digits (val) | | | | | {floor:.2f} | {floor_acc:.3f} | {floor_cov:.3f} | |",
    ]
    for r in results:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['spacing']} | {r['nfe']} | "
                     f"{r['guidance']} | "
                     f"{r['fid']:.2f} | {r['accuracy']:.3f} | {r['coverage']:.3f} | "
                     f"{r['seconds_per_sample']:.3f} |")
    with open(os.path.join(args.out_dir, "sampler_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out_dir, "sampler_table.json"), "w") as f:
        json.dump(dict(real_val=dict(fid=floor, accuracy=floor_acc, coverage=floor_cov),
                       rows=results, flags=vars(args)), f, indent=2)
    plotted = plot_fid(results, floor, os.path.join(args.out_dir, "sampler_table_fid.png"))
    print("\n".join(lines))
    print(f"wrote {args.out_dir}/sampler_table.md, .json, grids"
          + (" and sampler_table_fid.png" if plotted else ""))


# The model and classifier flags: only those given here override the args.json of a checkpoint.
MODEL_FLAGS = flag_fields(UNetConfig, ClassifierConfig, DiffusionConfig)


def create_argparser() -> argparse.ArgumentParser:
    parser = build_parser(
        __doc__.split("\n\n")[0], SamplerTableConfig,
        SampleConfig(num_samples=250, batch_size=250), GuidanceConfig, CommonConfig(seed=0),
        SamplerOptions,
        # Rows choose sampler, steps and guidance; output goes to --out_dir.
        drop=("use_ddim", "grid_size", "progress", "classifier_scale", "output_dir", "sampler",
              "steps", "cfg_scale", "eta"),
    )
    group = parser.add_argument_group("model flags", "override those in args.json if given")
    add_flags(group, MODEL_FLAGS, suppress=True)
    return parser


if __name__ == "__main__":
    cli.run_main(main)
