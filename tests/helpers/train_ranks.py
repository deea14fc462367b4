"""Run by tests/test_dist.py under torchrun or mpiexec (2 ranks): train a tiny U-Net for two
steps from a different seed and different data on each rank, then resume once with
`resume_checkpoint="auto"`, and write what each rank ended with to OUT_DIR/rank{R}.pt.

    python tests/helpers/train_ranks.py OUT_DIR
"""

import os
import sys

import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import TrainLoop  # noqa: E402

TINY = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
    attention_resolutions="8", num_heads=1, diffusion_steps=50,
)


def batches(seed: int):
    g = th.Generator().manual_seed(seed)
    while True:
        yield th.randn(2, 3, 16, 16, generator=g), {}


def train(out_dir: str, rank: int, steps: int, resume: str):
    th.manual_seed(1000 + rank)  # different init on each rank: sync_params must equalize
    flags = model_and_diffusion_defaults()
    flags.update(TINY)
    model, diffusion = create_model_and_diffusion(**flags)
    model.to(dist_util.dev())
    loop = TrainLoop(
        model=model, diffusion=diffusion, data=batches(seed=rank), batch_size=2, microbatch=1,
        lr=1e-3, ema_rate="0.9,0.5", log_interval=1, save_interval=100,
        resume_checkpoint=resume, lr_anneal_steps=steps,
    )
    init = [p.detach().clone() for p in model.parameters()]
    loop.run_loop()
    return loop, init


def main():
    out_dir = sys.argv[1]
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    logger.configure(dir=os.path.join(out_dir, "log"), format_strs=["log", "csv"] if rank == 0 else [])
    loop, init = train(out_dir, rank, steps=2, resume="")
    params = [p.detach().clone() for p in loop.model.parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(params, init))
    # Every rank reads the checkpoint rank 0 wrote, through the collective loader.
    saved = dist_util.load_state_dict(os.path.join(out_dir, "log", "model000002.pt"), map_location="cpu")
    # Logged means are averaged over ranks: rank r logs r.
    logger.logkv_mean("rank_mean", float(rank))
    averaged = logger.dumpkvs()["rank_mean"]
    resumed, _ = train(out_dir, rank, steps=3, resume="auto")
    th.save(
        {
            "world": dist_util.get_world_size(),
            "params": params,
            "saved": [saved[n] for n, _ in loop.model.named_parameters()],
            "moved": moved,
            "rank_mean": averaged,
            "resume_step": resumed.resume_step,
            "resumed_params": [p.detach().clone() for p in resumed.model.parameters()],
            "resumed_ema": [t.clone() for t in resumed.ema_params[0]],
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist_util.barrier()
    dist_util.cleanup()


if __name__ == "__main__":
    main()
