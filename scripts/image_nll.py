"""
Approximate the bits per dimension (bpd, Ho et al. 2020 eq. 5 in bits) of a model on a folder of
images: the full variational bound over every timestep (`calc_bpd_loop`). Writes the per-timestep
terms to `{vb,mse,xstart_mse}_terms.npz` beside the log.
"""

import argparse
import os

import numpy as np
import torch as th
import torch.distributed as dist

from guided_diffusion import cli, config, dist_util, logger
from guided_diffusion.image_datasets import load_data


def main():
    args = create_argparser().parse_args()
    cli.setup(args)

    logger.log("creating model and diffusion...")
    model, diffusion = cli.load_model_and_diffusion(args, "unet")

    logger.log("creating data loader...")
    cli.require_path(args.data_dir, "data_dir", kind="dir")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        deterministic=True,
        num_classes=args.num_classes,
    )

    logger.log("evaluating...")
    run_bpd_evaluation(model, diffusion, data, args.num_samples, args.clip_denoised, args.progress)


def _mean_over_ranks(x: th.Tensor) -> th.Tensor:
    """Average a tensor over ranks (each rank evaluated an equal-sized batch)."""
    _, world_size = cli.world()
    x = x.detach().clone()
    if world_size > 1:
        dist.all_reduce(x)
    return x / world_size


def run_bpd_evaluation(model, diffusion, data, num_samples: int, clip_denoised: bool,
                       progress: bool = True) -> float:
    """:return: the mean total bpd over the evaluated images."""
    rank, world_size = cli.world()
    all_bpd = []
    all_metrics = {"vb": [], "mse": [], "xstart_mse": []}
    num_complete = 0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_samples, desc="bpd", unit="img")
    while num_complete < num_samples:
        batch, model_kwargs = next(data)
        batch = batch.to(dist_util.dev())
        model_kwargs = {k: v.to(dist_util.dev()) for k, v in model_kwargs.items()}
        minibatch_metrics = diffusion.calc_bpd_loop(
            model, batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        for key, term_list in all_metrics.items():
            # [N x T] -> per-timestep mean over the batch and the ranks.
            term_list.append(_mean_over_ranks(minibatch_metrics[key].mean(dim=0)).cpu().numpy())
        all_bpd.append(_mean_over_ranks(minibatch_metrics["total_bpd"].mean()).item())
        num_complete += world_size * batch.shape[0]
        logger.log(f"done {num_complete} samples: bpd={np.mean(all_bpd)}")
        if bar is not None:
            bar.update(min(num_complete, num_samples) - bar.n)
            bar.set_postfix(bpd=f"{np.mean(all_bpd):.4f}")
    if bar is not None:
        bar.close()

    if rank == 0:
        for name, terms in all_metrics.items():
            out_path = os.path.join(logger.get_dir(), f"{name}_terms.npz")
            logger.log(f"saving {name} terms to {out_path}")
            np.savez(out_path, np.mean(np.stack(terms), axis=0))
    dist_util.barrier()
    logger.log("evaluation complete")
    return float(np.mean(all_bpd))


def create_argparser() -> argparse.ArgumentParser:
    # The sampling scripts' flags with the original's nll defaults; it writes no samples or grid.
    return config.build_parser(
        __doc__, config.NllConfig, config.SampleConfig(num_samples=1000, batch_size=1),
        config.UNetConfig, config.DiffusionConfig, config.CommonConfig, config.FastConfig,
        config.PresetConfig,
        drop=("use_ddim", "grid_size"),
    )

if __name__ == "__main__":
    cli.run_main(main)
