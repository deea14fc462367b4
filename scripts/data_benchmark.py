"""
Measure the data path on a folder of full-size images: what a start costs and what the loader
delivers, beside what a training step consumes.

- Start-up: the data index built from scratch (every image checked: 'header' or 'full'), then a
  restart that reuses it (nothing changed: no image opened), in seconds, with the images checked.
- Loader: images/s that one rank's `load_data` delivers at each crop size and worker count
  (decode, resize, crop, flip, collate; the first batch, which starts the workers, is timed apart).
- Step: images/s that one training step of the matching ADM config (scripts/benchmark.py's
  CONFIGS) consumes on this machine: the step's batch divided by its median time.

    python scripts/make_synthetic_imagenet.py --out /tmp/imnet-synth --num_images 50000
    python scripts/data_benchmark.py --data_dir /tmp/imnet-synth --workers 1,2 --image_sizes 64,256
    python scripts/data_benchmark.py --data_dir /tmp/imnet-synth --step_configs '' --checks full
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmark.py's model configs

import benchmark  # noqa: E402
from guided_diffusion import data_index  # noqa: E402
from guided_diffusion.config import DataBenchmarkConfig, build_parser  # noqa: E402
from guided_diffusion.image_datasets import load_data  # noqa: E402
from guided_diffusion.script_util import model_and_diffusion_defaults  # noqa: E402


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the check's workers): the work
    done, which a shared machine's load does not inflate as it inflates wall-clock time."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_startup(data_dir: str, check: str, workers: int) -> dict:
    """A first start (fresh index) and a restart (the same index, nothing changed)."""
    with tempfile.TemporaryDirectory() as index_dir:
        start, cpu = time.perf_counter(), cpu_seconds()
        first = data_index.build_listing(data_dir, index_dir, check, workers)
        first_s, first_cpu = time.perf_counter() - start, cpu_seconds() - cpu
        start, cpu = time.perf_counter(), cpu_seconds()
        again = data_index.build_listing(data_dir, index_dir, check, workers)
        restart_s, restart_cpu = time.perf_counter() - start, cpu_seconds() - cpu
        size = os.path.getsize(data_index.index_path(index_dir, data_dir))
    return {"check": check, "workers": workers, "images": len(first.files),
            "unreadable": len(first.bad), "first_start_s": first_s, "checked_first": first.checked,
            "restart_s": restart_s, "checked_restart": again.checked, "index_bytes": size,
            "first_start_cpu_s": first_cpu, "restart_cpu_s": restart_cpu}


def time_loader(data_dir: str, index_dir: str, size: int, workers: int, batch: int,
                seconds: float) -> dict:
    """
    Images/s one rank's loader delivers (after its first batch) for `seconds`, and the CPU
    milliseconds per image of the rank and its workers together (counting the batches the workers
    prepared ahead as undelivered: an upper bound, so 1000 / ms is at least what one free core
    delivers).
    """
    cpu = cpu_seconds()
    loader = load_data(data_dir=data_dir, batch_size=batch, image_size=size, class_cond=True,
                       seed=0, num_workers=workers, index_dir=index_dir)
    start = time.perf_counter()
    next(loader)
    first_s = time.perf_counter() - start
    start, images = time.perf_counter(), 0
    while images < 2 * batch or time.perf_counter() - start < seconds:
        images += len(next(loader)[0])
    elapsed = time.perf_counter() - start
    loader._it = None  # shuts the workers down (joined: their CPU time is counted)
    del loader
    gc.collect()
    cpu_ms = 1000 * (cpu_seconds() - cpu) / (images + batch)
    return {"image_size": size, "workers": workers, "batch": batch, "first_batch_s": first_s,
            "images": images, "seconds": elapsed, "images_per_s": images / elapsed,
            "cpu_ms_per_image": cpu_ms}


def time_step(config_name: str, batch: int, device: th.device, runs: int = 2) -> dict:
    """Images/s one training step of a benchmark.py config consumes (batch / median step time)."""
    if config_name not in benchmark.CONFIGS:
        raise SystemExit(f"--step_configs: unknown config {config_name!r}; known: "
                         f"{sorted(benchmark.CONFIGS)}")
    config = benchmark.CONFIGS[config_name]
    flags = dict(model_and_diffusion_defaults(), **config["flags"])
    batch = batch or config["train_batch"]
    model, _ = benchmark.create_model_and_diffusion(**flags)
    benchmark.init_weights(model)
    variant = benchmark.Variant("fp16" if device.type == "cuda" else "faithful", flags,
                                model.state_dict(), device)
    del model
    data = benchmark.make_batch(flags, batch, device, seed=1)
    variant.train_step(data)  # first call: one-off costs
    times = [benchmark.timed(lambda: variant.train_step(data), device) for _ in range(runs)]
    step_s = statistics.median(times)
    return {"config": config_name, "image_size": flags["image_size"], "batch": batch,
            "step_s": step_s, "images_per_s": batch / step_s, "variant": variant.name}


def run(args) -> dict:
    if not args.data_dir or not os.path.isdir(args.data_dir):
        raise SystemExit(f"--data_dir {args.data_dir!r}: no such folder")
    sizes = [int(s) for s in args.image_sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    device = th.device(args.device or ("cuda" if th.cuda.is_available() else "cpu"))
    if args.threads:
        th.set_num_threads(args.threads)
    steps = {}
    for item in filter(None, args.step_configs.split(",")):
        size, _, name = item.partition(":")
        steps[int(size)] = name
    report = {"machine": benchmark.machine_description(device), "cpus": os.cpu_count(),
              "torch_threads": th.get_num_threads(),
              "load_average_1min_start": os.getloadavg()[0], "startup": [], "loader": [],
              "step": []}
    for check in args.checks.split(","):
        row = time_startup(args.data_dir, check, max(workers))
        report["startup"].append(row)
        print(f"start-up ({check} check, {row['workers']} workers): first "
              f"{row['first_start_s']:.1f} s ({row['checked_first']} images checked), restart "
              f"{row['restart_s']:.2f} s ({row['checked_restart']} checked)", flush=True)
    with tempfile.TemporaryDirectory() as index_dir:
        data_index.build_listing(args.data_dir, index_dir, "header", max(workers))
        for size in sizes:
            for w in workers:
                row = time_loader(args.data_dir, index_dir, size, w, args.batch_size,
                                  args.seconds)
                report["loader"].append(row)
                print(f"loader {size} px, {w} workers: {row['images_per_s']:.0f} images/s "
                      f"(first batch {row['first_batch_s']:.1f} s, {row['cpu_ms_per_image']:.1f} "
                      "CPU ms per image)", flush=True)
    for size, name in steps.items():
        row = time_step(name, args.step_batch, device)
        report["step"].append(row)
        print(f"step {name} ({size} px, batch {row['batch']}, {device.type}): "
              f"{row['step_s']:.2f} s = {row['images_per_s']:.2f} images/s", flush=True)
    report["load_average_1min_end"] = os.getloadavg()[0]
    return report


def format_table(report: dict) -> str:
    lines = [f"{report['machine']}; {report['cpus']} CPUs; 1-min load average "
             f"{report['load_average_1min_start']:.1f} at the start, "
             f"{report['load_average_1min_end']:.1f} at the end", "",
             "| start-up | images | first start s (CPU s) | checked | restart s (CPU s) | checked "
             "| restart / first: wall (CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["startup"]:
        lines.append(
            f"| {r['check']} check, {r['workers']} workers | {r['images']} | "
            f"{r['first_start_s']:.1f} ({r['first_start_cpu_s']:.1f}) | {r['checked_first']} | "
            f"{r['restart_s']:.2f} ({r['restart_cpu_s']:.2f}) | {r['checked_restart']} | "
            f"{100 * r['restart_s'] / r['first_start_s']:.1f}% "
            f"({100 * r['restart_cpu_s'] / max(r['first_start_cpu_s'], 1e-9):.1f}%) |")
    lines += ["", "| crop px | workers | images/s delivered (one rank) | first batch s | "
              "CPU ms per image |", "|---:|---:|---:|---:|---:|"]
    for r in report["loader"]:
        lines.append(f"| {r['image_size']} | {r['workers']} | {r['images_per_s']:.0f} | "
                     f"{r['first_batch_s']:.1f} | {r['cpu_ms_per_image']:.1f} |")
    if report["step"]:
        lines += ["", "| training step | px | batch | step s | images/s consumed |",
                  "|---|---:|---:|---:|---:|"]
        for r in report["step"]:
            lines.append(f"| {r['config']} ({r['variant']}) | {r['image_size']} | {r['batch']} | "
                         f"{r['step_s']:.2f} | {r['images_per_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = create_argparser().parse_args(argv)
    report = run(args)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def create_argparser() -> argparse.ArgumentParser:
    return build_parser(__doc__.split("\n\n")[1], DataBenchmarkConfig)


if __name__ == "__main__":
    main()
