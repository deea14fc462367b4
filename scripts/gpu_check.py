"""
One command that checks a GPU machine before a long run: speed, memory and achieved FLOP/s of the
released ImageNet layouts (random weights), in the three precisions a user can pick, and the
bandwidth between two GPUs.

For the 64x64 conditional ADM (`adm64`) and the 256x256 ADM (`adm256`), built from the original
README's flags, and for each precision

- `fp32`: the faithful path in float32;
- `fp16`: the original's `--use_fp16` (`convert_to_fp16`, fp16 loss scaling in training);
- `fast-bf16` / `fast-fp16` / `fast-fp32`: `--fast True`, the preset `guided_diffusion.fast`
  picks for the device, labelled by the precision it chose (compute capability >= 8.0: bf16
  autocast + SDPA + channels_last + fused blocks and AdamW; below 8.0 the original's fp16 with the
  same switches; a CPU without bf16 instructions: float32),

it reports sampling throughput (images through one network evaluation per second: divide by the
number of sampling steps for finished samples per second), the time of one training step
(forward + backward + AdamW), the peak memory (`torch.cuda.max_memory_allocated`) and the achieved
TFLOP/s (FLOPs counted with `FlopCounterMode`, divided by the measured time). Timing, batches,
weights and FLOP counting are scripts/benchmark.py's: this script runs it per layout and adds the
all-reduce check. With two or more GPUs, two processes all-reduce a buffer over NCCL and report the
bus bandwidth; with fewer, that check is skipped with a line saying why.

    python scripts/gpu_check.py --out gpu_check.json          # a few minutes on one H100/H200
    python scripts/gpu_check.py --smoke --out smoke.json      # seconds on a CPU (the test runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import torch as th
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: benchmark
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmark  # noqa: E402
from guided_diffusion import config, script_util  # noqa: E402

# benchmark.py's variant names -> the names this report uses.
PRECISIONS = {"faithful": "fp32", "fp16": "fp16"}


def precision_label(variant: str, switches: str) -> str:
    """A row's precision: the variant's, or for `fast` the one its preset chose on this device."""
    if variant != "fast":
        return PRECISIONS[variant]
    on = switches.split("+")
    return "fast-" + ("bf16" if "use_bf16" in on else "fp16" if "use_fp16" in on else "fp32")
FULL_LAYOUTS = ("adm64", "adm256")  # benchmark.CONFIGS entries with the README's flags
SMOKE_LAYOUTS = ("tiny",)


def parse_args(argv=None) -> argparse.Namespace:
    parser = config.build_parser(__doc__.split("\n\n")[1], config.GpuCheckConfig)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, one timed run, CPU unless --device says otherwise: "
                             "checks the script itself, measures nothing of interest")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# FLOPs of the released layouts, without weights or a GPU


def network_flops(kind: str, flags: dict) -> int:
    """
    FLOPs (2 per multiply-add; convolutions, matmuls and attention as `FlopCounterMode` counts
    them, not GroupNorm or activations) of one network evaluation at batch 1, counted on
    `device="meta"`: shapes only, so even the 512x512 layouts take well under a second.

    :param kind: "unet" (image_*.py / classifier_sample.py model), "superres" (super_res_*.py) or
        "classifier": the guidance gradient, a classifier forward plus the backward to its input
        (what `guidance.classifier_cond_fn` computes at every guided step).
    :param flags: the script's flags (missing ones take the script defaults).
    :return: FLOPs of one evaluation of one sample.
    """
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    meta = th.device("meta")
    t = th.zeros(1, dtype=th.long, device=meta)
    y = th.zeros(1, dtype=th.long, device=meta)
    # fp16 conversion does not change FLOPs and needs real storage: count the float32 layout.
    if kind == "unet":
        defaults = script_util.model_and_diffusion_defaults()
        args = {k: v for k, v in dict(defaults, **flags).items() if k in defaults}
        args["use_fp16"] = False
        with meta:
            model, _ = script_util.create_model_and_diffusion(**args)
        size = args["image_size"]
        kwargs = {"y": y} if args["class_cond"] else {}
    elif kind == "superres":
        defaults = script_util.sr_model_and_diffusion_defaults()
        args = {k: v for k, v in dict(defaults, **flags).items() if k in defaults}
        args["use_fp16"] = False
        with meta:
            model, _ = script_util.sr_create_model_and_diffusion(**args)
        size, small = args["large_size"], args["small_size"]
        kwargs = {"low_res": th.zeros(1, 3, small, small, device=meta)}
        if args["class_cond"]:
            kwargs["y"] = y
    elif kind == "classifier":
        defaults = script_util.classifier_and_diffusion_defaults()
        args = {k: v for k, v in dict(defaults, **flags).items() if k in defaults}
        args["classifier_use_fp16"] = False
        with meta:
            model, _ = script_util.create_classifier_and_diffusion(**args)
        size = args["image_size"]
    else:
        raise ValueError(f"network_flops: unknown kind {kind!r} (unet, superres, classifier)")
    x = th.zeros(1, 3, size, size, device=meta)
    if kind != "classifier":
        with FlopCounterMode(display=False) as counter, th.no_grad():
            model(x, t, **kwargs)
        return counter.get_total_flops()
    # Only the input needs a gradient, as in classifier_cond_fn's autograd.grad(..., x): frozen
    # weights make autograd skip the weight gradients. (FlopCounterMode's module hooks do not
    # support autograd.grad itself, so this calls backward() on the same graph.)
    model.requires_grad_(False)
    x.requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        F.log_softmax(model(x, t), dim=-1)[:, 0].sum().backward()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------
# All-reduce bandwidth


def _allreduce_worker(rank: int, world: int, backend: str, init_file: str, numel: int,
                      iters: int, results) -> None:
    import torch.distributed as dist

    device = th.device("cuda", rank) if backend == "nccl" else th.device("cpu")
    if device.type == "cuda":
        th.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        buf = th.ones(numel, dtype=th.float32, device=device)
        dist.all_reduce(buf)  # warm-up: builds the communicator (seconds for NCCL)
        ok = bool((buf == world).all())
        times = []
        for _ in range(iters):
            benchmark.sync(device)
            start = time.perf_counter()
            dist.all_reduce(buf)
            benchmark.sync(device)
            times.append(time.perf_counter() - start)
        if rank == 0:
            results.put({"ok": ok, "times_s": times})
    finally:
        dist.destroy_process_group()


def allreduce_check(mode: str, mib: int, iters: int) -> dict:
    """
    Two processes all-reduce a float32 buffer of `mib` MiB; report the median time and the bus
    bandwidth 2 (n - 1) / n * bytes / time (NCCL's busbw: what each link carries), n = 2.

    :param mode: "auto" (NCCL when two GPUs are present, else skipped), "nccl", "gloo" (CPU; for
        the smoke test) or "off".
    :return: a dict with `backend`, `ok`, `median_s`, `busbw_gb_s`, or `skipped` with the reason.
    """
    gpus = th.cuda.device_count() if th.cuda.is_available() else 0
    if mode == "off":
        return {"skipped": "--allreduce off"}
    if mode == "auto":
        if gpus < 2:
            return {"skipped": f"all-reduce check needs 2 GPUs, found {gpus}"}
        mode = "nccl"
    if mode == "nccl" and gpus < 2:
        raise SystemExit(f"--allreduce nccl: needs 2 GPUs, found {gpus}")
    world, numel = 2, mib * 2**20 // 4
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_allreduce_worker,
                             args=(r, world, mode, init_file, numel, iters, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)  # a hung communicator must not hang the whole check
            if p.is_alive():
                p.kill()
                p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed or results.empty():
        return {"backend": mode, "ok": False,
                "error": f"worker exit codes {failed} (negative: killed, e.g. after 300 s)"}
    res = results.get()
    med = sorted(res["times_s"])[len(res["times_s"]) // 2]
    nbytes = numel * 4
    return {"backend": mode, "ok": res["ok"], "mib": mib, "median_s": med,
            "busbw_gb_s": 2 * (world - 1) / world * nbytes / med / 1e9, "times_s": res["times_s"]}


# ------------------------------------------------------------------------------------------------
# The check


class StepPeakMemory(benchmark.PeakMemory):
    """
    benchmark.PeakMemory, but on CUDA the step's own peak: `max_memory_allocated` minus what was
    allocated when the step began, as benchmark.py already measures on CPU (RSS growth).

    benchmark.run keeps every variant's weights and optimizer state on the GPU at once, so the
    plain allocator peak would charge each variant with the others' resident memory.
    """

    @contextlib.contextmanager
    def measure(self):
        if self.device.type != "cuda":
            with super().measure():
                yield
            return
        th.cuda.synchronize(self.device)
        base = th.cuda.memory_allocated(self.device)
        th.cuda.reset_peak_memory_stats(self.device)
        yield
        th.cuda.synchronize(self.device)
        step_peak = th.cuda.max_memory_allocated(self.device) - base
        self.peak_bytes = max(self.peak_bytes, step_peak)


def check_layout(name: str, device: str, variants: str, runs: int, train_batch: int = 0,
                 sample_batch: int = 0) -> dict:
    """Run benchmark.py's measurement for one layout and turn it into this report's rows."""
    bench_args = benchmark.create_argparser().parse_args([
        "--config", name, "--device", device, "--variants", variants, "--runs", str(runs),
        "--warmup", "1",  # warm-up (kernel selection, allocator growth) is never timed
        "--train_batch", str(train_batch), "--sample_batch", str(sample_batch),
    ])
    # benchmark.Variant looks PeakMemory up at call time: swap in the per-step measure.
    saved, benchmark.PeakMemory = benchmark.PeakMemory, StepPeakMemory
    try:
        report = benchmark.run(bench_args)
    finally:
        benchmark.PeakMemory = saved
    rows = []
    for r in report["results"]:
        rows.append({
            "precision": precision_label(r["variant"], r["switches"]),
            "switches": r["switches"],
            # images through one network evaluation per second (one sampler step)
            "sample_images_per_s": report["sample_batch"] / r["sample"]["median_s"],
            "sample_forward_s": r["sample"]["median_s"],
            "sample_tflops": r["sample"]["gflops"] / 1e3,
            "sample_peak_mib": r["sample"]["peak_mib"],
            "train_step_s": r["train"]["median_s"],
            "train_tflops": r["train"]["gflops"] / 1e3,
            "train_peak_mib": r["train"]["peak_mib"],
            "rel_err_vs_fp32": r["rel_err"],
        })
    return {
        "layout": name,
        "model_flags": report["model_flags"],
        "num_params": report["num_params"],
        "sample_batch": report["sample_batch"],
        "train_batch": report["train_batch"],
        "gflop_per_sample_forward_batch": report["gflop"]["sample"],
        "gflop_per_train_step_batch": report["gflop"]["train"],
        "rows": rows,
    }


def format_table(result: dict) -> str:
    lines = [f"gpu_check on {result['device']} (torch {result['torch']}, "
             f"{'smoke' if result['smoke'] else 'full'}, {result['wall_s']:.0f} s)", ""]
    header = ["layout", "precision", "sample img/s (per step)", "sample TFLOP/s",
              "sample peak MiB", "train step s", "train TFLOP/s", "train peak MiB",
              "rel. err vs fp32"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|---|" + "---:|" * (len(header) - 2))
    for lay in result["layouts"]:
        for r in lay["rows"]:
            lines.append(
                f"| {lay['layout']} (batch {lay['sample_batch']}/{lay['train_batch']}) "
                f"| {r['precision']} | {r['sample_images_per_s']:.1f} | {r['sample_tflops']:.2f} "
                f"| {r['sample_peak_mib']:.0f} | {r['train_step_s']:.3f} | {r['train_tflops']:.2f} "
                f"| {r['train_peak_mib']:.0f} | {r['rel_err_vs_fp32']:.1e} |"
            )
    ar = result["allreduce"]
    lines.append("")
    if "skipped" in ar:
        lines.append(f"all-reduce: skipped ({ar['skipped']})")
    elif "error" in ar:
        lines.append(f"all-reduce ({ar['backend']}): FAILED, {ar['error']}")
    else:
        lines.append(f"all-reduce ({ar['backend']}, 2 processes, {ar['mib']} MiB): "
                     f"{ar['median_s'] * 1e3:.2f} ms, bus bandwidth {ar['busbw_gb_s']:.1f} GB/s, "
                     f"result {'correct' if ar['ok'] else 'WRONG'}")
    lines.append("batch a/b: sampling batch / training batch. img/s per step: divide by the "
                 "number of sampling steps for finished images/s. peak MiB: the step's own peak "
                 "above the memory allocated before it (activations, gradients, temporaries; on "
                 "CPU the RSS growth); weights and optimizer state come on top.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    device = args.device or ("cuda" if th.cuda.is_available() and not args.smoke else "cpu")
    layouts = [s for s in (args.layouts or ",".join(
        SMOKE_LAYOUTS if args.smoke else FULL_LAYOUTS)).split(",") if s]
    runs = args.runs or (1 if args.smoke else 5)
    # The original's fp16 kernels are CUDA-only; on a CPU the check covers fp32 and the preset.
    variants = "faithful,fp16,fast" if device.startswith("cuda") else "faithful,fast"
    if device.startswith("cuda"):
        th.backends.cudnn.benchmark = True  # pick the fastest conv kernels, as long runs would
    result = {
        "device": benchmark.machine_description(th.device(device)),
        "torch": th.__version__,
        "cuda": th.version.cuda,
        "smoke": args.smoke,
        "tf32": {"matmul": th.backends.cuda.matmul.allow_tf32,
                 "cudnn": th.backends.cudnn.allow_tf32},
        "runs": runs,
        "layouts": [check_layout(name, device, variants, runs, args.train_batch, args.sample_batch)
                    for name in layouts],
    }
    if th.cuda.is_available():
        th.cuda.empty_cache()  # hand the benchmarks' cached blocks back before the workers start
    result["allreduce"] = allreduce_check(args.allreduce, args.allreduce_mib or (1 if args.smoke
                                                                                  else 256),
                                          iters=3 if args.smoke else 10)
    result["wall_s"] = time.perf_counter() - start
    print(format_table(result))
    # Written atomically: a reader never sees half a report.
    out_dir = os.path.dirname(os.path.abspath(args.out))
    with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=1)
    os.replace(f.name, args.out)
    return result


if __name__ == "__main__":
    main()
