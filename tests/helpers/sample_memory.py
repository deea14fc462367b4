"""Peak memory (ru_maxrss) of sampling 64 px samples in a child process, for several counts.

    python tests/helpers/sample_memory.py OUT_DIR 2000 20000 [--root REPO] [--fake]

By default the child is scripts/image_sample.py on a tiny model (32 channels, 1 res block,
2 steps, batch 100, one process). With --fake the child calls `sample_util.sample_and_save` with
a sampler that makes pseudo-random pixels without a network: the output path alone (shards,
merge) at full scale, minutes of CPU sampling removed. `--root` runs another checkout's code
(e.g. an export of main, to compare). Prints one line per count: seconds, peak RSS, sample MB.
"""

import argparse
import os
import pathlib
import subprocess
import sys
import time

import torch as th

HERE = pathlib.Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parents[1]))

from conftest import crc32_init_  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

MODEL = dict(image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,1,1",
             attention_resolutions="", diffusion_steps=50)


FAKE_CHILD = """
import argparse, sys, torch as th
from guided_diffusion import sample_util
def sample_fn(indices, seed=0):
    g = th.Generator().manual_seed(len(indices) * 1000 + indices[0])
    images = th.randint(0, 256, (len(indices), 64, 64, 3), generator=g, dtype=th.uint8)
    return images, th.tensor(indices) % 1000
n, out = int(sys.argv[1]), sys.argv[2]
args = argparse.Namespace(num_samples=n, shard_size=1000, batch_size=100, seed=0, progress=False,
                          grid_size=100, output_dir=out)
sample_util.sample_and_save(sample_fn, args, 64, with_labels=True)
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("counts", type=int, nargs="+")
    parser.add_argument("--root", default=str(HERE.parents[2]))
    parser.add_argument("--fake", action="store_true", help="no network: the output path only")
    args = parser.parse_args()
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flags = model_and_diffusion_defaults()
    flags.update(MODEL)
    model, _ = create_model_and_diffusion(**flags)
    th.save(crc32_init_(model).state_dict(), out / "model.pt")
    model_flags = []
    for k, v in MODEL.items():
        model_flags += [f"--{k}", str(v)]
    env = dict(os.environ, PYTHONPATH=args.root, OMP_NUM_THREADS="1")
    for count in args.counts:
        cmd = [sys.executable, os.path.join(args.root, "scripts", "image_sample.py"), *model_flags,
               "--timestep_respacing", "2", "--model_path", str(out / "model.pt"),
               "--num_samples", str(count), "--batch_size", "100", "--progress", "False",
               "--seed", "0", "--output_dir", str(out / f"run{count}")]
        if args.fake:
            cmd = [sys.executable, "-c", FAKE_CHILD, str(count), str(out / f"fake{count}")]
        start = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, cwd=args.root)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        if status != 0:
            sys.exit(f"{' '.join(cmd)} failed ({status})")
        print(f"samples {count}: {time.time() - start:.1f} s, peak RSS {usage.ru_maxrss / 1024:.0f}"
              f" MB, samples {count * 64 * 64 * 3 / 2**20:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
