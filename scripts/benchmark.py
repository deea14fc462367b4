"""
Measure the faithful path against the fast path, side by side in one run.

For a named model config, each variant (a set of fast-path switches, see guided_diffusion/fast.py)
gets its own copy of the same weights, and the script reports:

- the median wall-clock seconds of a training step: `diffusion.training_losses` + backward +
  AdamW step, through the project's `MixedPrecisionTrainer` (fp16 loss scaling and bf16 autocast
  as the training script runs them);
- the median seconds of a sampling forward: one `model(x, t, y)` call under `no_grad`, the unit
  a sampler repeats `timestep_respacing` times per batch;
- peak memory, achieved GFLOP/s (the FLOPs of the faithful model counted once with
  `torch.utils.flop_counter.FlopCounterMode`, divided by each variant's time), the time ratio to
  the faithful variant, and the sampling output's relative error to the float32 output.

Variants are timed interleaved (run i of every variant, then run i + 1 of every variant), so a
machine whose load changes during the run slows all of them alike and the ratios stay fair.

    python scripts/benchmark.py --config bench64 --runs 5
    python scripts/benchmark.py --config bench64 --variants original,faithful,sdpa,fused,fast
    python scripts/benchmark.py --config adm256 --device cuda      # faithful, fp16, fast
    python scripts/benchmark.py --variants original,fast --original_path ../guided-diffusion

The `original` variant is the original code's computation. With `--original_path` (a checkout of
openai/guided-diffusion) it is that code itself, imported beside this package under another name
(`openai_guided_diffusion`; its script_util, unet and fp16_util need only torch and numpy), with
its own MixedPrecisionTrainer; without it, this project's faithful path with every attention block
checkpointed, as the original always does.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import fast, hardware  # noqa: E402
from guided_diffusion.config import BenchmarkConfig, build_parser  # noqa: E402
from guided_diffusion.fp16_util import MixedPrecisionTrainer  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.unet import AttentionBlock  # noqa: E402

# Named configs: overrides of model_and_diffusion_defaults() and the batch sizes to time.
CONFIGS = {
    # For the test suite: seconds on a CPU.
    "tiny": dict(
        flags=dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16,8",
                   num_head_channels=16, class_cond=True, num_classes=10, learn_sigma=True,
                   resblock_updown=True, use_scale_shift_norm=True, use_new_attention_order=True),
        train_batch=2, sample_batch=2,
    ),
    # The benchmark config: an ADM-64 layout at a third of the width.
    "bench64": dict(
        flags=dict(image_size=64, num_channels=64, num_res_blocks=2,
                   attention_resolutions="32,16,8", num_head_channels=32,
                   class_cond=True, learn_sigma=True, resblock_updown=True,
                   use_scale_shift_norm=True, use_new_attention_order=True),
        train_batch=8, sample_batch=16,
    ),
    # The released ImageNet models' flags (the original README; precision is the variant's choice).
    "adm64": dict(
        flags=dict(image_size=64, num_channels=192, num_res_blocks=3,
                   attention_resolutions="32,16,8", num_head_channels=64,
                   class_cond=True, learn_sigma=True, resblock_updown=True,
                   use_scale_shift_norm=True, use_new_attention_order=True, dropout=0.1,
                   noise_schedule="cosine"),
        train_batch=32, sample_batch=64,
    ),
    "adm256": dict(
        flags=dict(image_size=256, num_channels=256, num_res_blocks=2,
                   attention_resolutions="32,16,8", num_head_channels=64,
                   class_cond=True, learn_sigma=True, resblock_updown=True,
                   use_scale_shift_norm=True),
        train_batch=8, sample_batch=16,
    ),
}

# Variant atoms; a variant is atoms joined by "+", e.g. "bf16+sdpa".
ATOMS = {
    "faithful": {},
    # The original guided-diffusion's computation: the faithful path with every attention block
    # checkpointed, as the original always does (attention recomputed in the backward pass).
    "original": {},
    "fp16": dict(use_fp16=True),  # the original's fp16 weights (CUDA)
    "bf16": dict(use_bf16=True),
    "sdpa": dict(use_sdpa=True),
    "channels_last": dict(channels_last=True),
    "compile": dict(compile_model=True),
    "fused": dict(fused_blocks=True),
    "fused_adam": dict(fused_adam=True),
    "malloc_cache": dict(malloc_cache=True),  # process-wide: measure it with --isolate
    "fast": dict(fast=True),  # the preset for this device (what it resolved to is printed)
}


def variant_flags(name: str) -> dict:
    """Fast-path flags (plus use_fp16) of a variant name such as 'bf16+channels_last'."""
    flags = dict(fast.fast_defaults(), use_fp16=False)
    for atom in name.split("+"):
        if atom not in ATOMS:
            raise SystemExit(
                f"--variants: unknown switch {atom!r} in {name!r}; known: {sorted(ATOMS)}"
            )
        flags.update(ATOMS[atom])
    return flags


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or on CPU the peak resident set size.

    On CPU there is no allocator statistic, so a thread samples the process RSS every
    millisecond; freed memory is first handed back to the OS (`malloc_trim`) so that the
    growth over the RSS at entry is the block's own working set (activations, gradients,
    temporary copies).
    """

    def __init__(self, device: th.device):
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @contextlib.contextmanager
    def measure(self):
        if self.device.type == "cuda":
            th.cuda.synchronize(self.device)
            th.cuda.reset_peak_memory_stats(self.device)
            yield
            th.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes, th.cuda.max_memory_allocated(self.device))
            return
        if not os.path.exists("/proc/self/statm"):
            yield  # no cheap RSS reading on this OS: memory column stays empty
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = self._rss()
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], self._rss())
                done.wait(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            peak[0] = max(peak[0], self._rss())
            self.peak_bytes = max(self.peak_bytes, peak[0] - base)


def init_weights(model: th.nn.Module, seed: int = 0) -> None:
    """Seeded non-zero weights everywhere, zero-initialized output layers included.

    A fresh ADM model outputs zeros (its last convolutions start at zero), which would make
    every variant look exact; weights ~ N(0, 1/fan_in) give outputs of order one.
    """
    g = th.Generator().manual_seed(seed)
    with th.no_grad():
        for _, p in sorted(model.state_dict().items()):
            if not p.is_floating_point():
                continue
            r = th.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(r / p[0].numel() ** 0.5)
            else:
                p.copy_(0.05 * r)


ORIGINAL_PACKAGE = "openai_guided_diffusion"  # the name the original's package is imported as


def import_original(path: str) -> tuple:
    """(script_util, fp16_util) of the original guided_diffusion package in a checkout at `path`,
    imported as `openai_guided_diffusion` so that it sits beside this project's package."""
    package_dir = os.path.join(path, "guided_diffusion")
    init = os.path.join(package_dir, "__init__.py")
    if not os.path.isfile(init):
        raise SystemExit(f"--original_path {path!r}: no guided_diffusion/__init__.py there "
                         "(expected a checkout of openai/guided-diffusion)")
    if ORIGINAL_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            ORIGINAL_PACKAGE, init, submodule_search_locations=[package_dir])
        package = importlib.util.module_from_spec(spec)
        sys.modules[ORIGINAL_PACKAGE] = package
        spec.loader.exec_module(package)
    return (importlib.import_module(f"{ORIGINAL_PACKAGE}.script_util"),
            importlib.import_module(f"{ORIGINAL_PACKAGE}.fp16_util"))


class Variant:
    """One variant's model, trainer, optimizer and timings."""

    def __init__(self, name, model_flags, state_dict, device, original_path: str = ""):
        self.name = name
        flags = variant_flags(name)
        self.cfg = fast.resolve_fast_flags(flags, device)
        self.use_fp16 = self.cfg.use_fp16
        self.device = device
        create, trainer_class, trainer_kwargs = (
            create_model_and_diffusion, MixedPrecisionTrainer, dict(use_bf16=self.cfg.use_bf16))
        if name == "original" and original_path:
            script_util, fp16_util = import_original(original_path)
            keys = script_util.model_and_diffusion_defaults()

            def create(**f):  # the original's flags only (this project's extras are off here)
                return script_util.create_model_and_diffusion(
                    **{k: v for k, v in f.items() if k in keys})
            trainer_class, trainer_kwargs = fp16_util.MixedPrecisionTrainer, {}
        # Training copy: the trainer converts to fp16 itself and keeps float32 master weights.
        self.model, self.diffusion = create(**model_flags)
        self.model.load_state_dict(state_dict)
        self.model.to(device).train()
        self.trainer = trainer_class(model=self.model, use_fp16=self.use_fp16, **trainer_kwargs)
        self.autocast = getattr(self.trainer, "autocast", contextlib.nullcontext)
        self.opt = th.optim.AdamW(self.trainer.master_params, lr=1e-4, weight_decay=0.0,
                                  fused=self.cfg.fused_adam or None)
        fast.apply_fast_path(self.model, **self.cfg.model_kwargs())
        # Sampling copy, as the sampling scripts load it: eval mode, fp16 after loading.
        self.sampler, _ = create(**model_flags)
        self.sampler.load_state_dict(state_dict)
        self.sampler.to(device).eval()
        if self.use_fp16:
            self.sampler.convert_to_fp16()
        fast.apply_fast_path(self.sampler, **self.cfg.model_kwargs())
        if "original" in name.split("+") and not original_path:
            for module in self.model.modules():
                if isinstance(module, AttentionBlock):
                    module.use_checkpoint = True
        self.times = {"train": [], "sample": []}
        self.first_call = {}
        self.memory = {"train": PeakMemory(device), "sample": PeakMemory(device)}
        self.output = None

    def train_step(self, batch):
        x, t, kwargs = batch
        self.trainer.zero_grad()
        with self.autocast():
            losses = self.diffusion.training_losses(self.model, x, t, model_kwargs=kwargs)
        self.trainer.backward(losses["loss"].float().mean())
        self.trainer.optimize(self.opt)

    def sample_forward(self, batch):
        x, t, kwargs = batch
        with th.no_grad(), fast.autocast_context(self.device, self.cfg.use_bf16):
            self.output = self.sampler(x, t, **kwargs)


def make_batch(model_flags, batch_size, device, seed):
    """(x, t, model_kwargs): images in [-1, 1], timesteps and labels, all seeded."""
    g = th.Generator().manual_seed(seed)
    size = model_flags["image_size"]
    x = th.rand(batch_size, 3, size, size, generator=g) * 2 - 1
    t = th.randint(0, model_flags["diffusion_steps"], (batch_size,), generator=g)
    kwargs = {}
    if model_flags["class_cond"]:
        kwargs["y"] = th.randint(0, model_flags["num_classes"], (batch_size,), generator=g)
    return x.to(device), t.to(device), {k: v.to(device) for k, v in kwargs.items()}


def count_flops(model_flags, state_dict, train_batch, sample_batch, device) -> dict:
    """FLOPs of one sampling forward and one training forward+backward of the faithful model."""
    from torch.utils.flop_counter import FlopCounterMode

    model, diffusion = create_model_and_diffusion(**model_flags)
    model.load_state_dict(state_dict)
    model.to(device)
    x, t, kwargs = sample_batch
    model.eval()
    with FlopCounterMode(display=False) as counter, th.no_grad():
        model(x, t, **kwargs)
    sample_flops = counter.get_total_flops()
    x, t, kwargs = train_batch
    model.train()
    with FlopCounterMode(display=False) as counter:
        diffusion.training_losses(model, x, t, model_kwargs=kwargs)["loss"].mean().backward()
    return {"sample": sample_flops, "train": counter.get_total_flops()}


def sync(device):
    if device.type == "cuda":
        th.cuda.synchronize(device)


def timed(fn, device, clock=time.perf_counter) -> float:
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def machine_description(device) -> str:
    facts = hardware.detect(device)
    if device.type == "cuda":
        return f"{th.cuda.get_device_name(device)}, {facts.describe()}"
    return f"{hardware.cpu_name()}, {th.get_num_threads()} threads, {facts.describe()}"


def variant_names(args) -> tuple[th.device, list[str]]:
    """The device and the `--variants` names (default per device), each checked before any
    minutes are spent on the others."""
    device = th.device(args.device or ("cuda" if th.cuda.is_available() else "cpu"))
    variants = args.variants or ("faithful,fp16,fast" if device.type == "cuda" else "faithful,fast")
    names = [v.strip() for v in variants.split(",") if v.strip()]
    for name in names:
        if variant_flags(name)["use_fp16"] and device.type != "cuda":
            raise SystemExit(f"variant {name!r}: the original's fp16 needs --device cuda")
    return device, names


def run(args) -> dict:
    device, names = variant_names(args)
    if args.timer not in ("wall", "cpu"):
        raise SystemExit(f"--timer: {args.timer!r} is not 'wall' or 'cpu'")
    if args.config not in CONFIGS:
        raise SystemExit(f"--config: unknown config {args.config!r}; known: {sorted(CONFIGS)}")
    config = CONFIGS[args.config]
    model_flags = dict(model_and_diffusion_defaults(), **config["flags"])
    train_batch_size = args.train_batch or config["train_batch"]
    sample_batch_size = args.sample_batch or config["sample_batch"]
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    for p in phases:
        if p not in ("train", "sample"):
            raise SystemExit(f"--phases: unknown phase {p!r} (use train, sample)")
    if args.timer == "cpu" and device.type == "cuda":
        raise SystemExit("--timer cpu measures CPU work; on CUDA use the default wall clock")
    clock = time.process_time if args.timer == "cpu" else time.perf_counter

    base, _ = create_model_and_diffusion(**model_flags)
    init_weights(base)
    state_dict = base.state_dict()
    num_params = sum(p.numel() for p in base.parameters())
    del base
    batches = {
        "train": make_batch(model_flags, train_batch_size, device, seed=1),
        "sample": make_batch(model_flags, sample_batch_size, device, seed=2),
    }
    flops = count_flops(model_flags, state_dict, batches["train"], batches["sample"], device)
    runners = [Variant(n, model_flags, state_dict, device, args.original_path) for n in names]

    # Reference output for the error column: the float32 faithful forward.
    reference = (
        None if "faithful" in names else Variant("faithful", model_flags, state_dict, device)
    )
    for phase in phases:
        for v in runners:
            fn = (lambda v=v: v.train_step(batches["train"])) if phase == "train" else (
                lambda v=v: v.sample_forward(batches["sample"]))
            # The first call includes one-off costs (torch.compile, oneDNN weight packing).
            v.first_call[phase] = timed(fn, device, clock)
            for _ in range(max(args.warmup - 1, 0)):
                fn()
        for _ in range(args.runs):
            for v in runners:  # interleaved: every variant sees the same machine load
                fn = (lambda v=v: v.train_step(batches["train"])) if phase == "train" else (
                    lambda v=v: v.sample_forward(batches["sample"]))
                v.times[phase].append(timed(fn, device, clock))
        # Peak memory in one more, untimed call: on CPU the measurement hands freed memory back
        # to the OS first, and the step would then pay page faults that a training or sampling
        # run does not (it inflated the largest working sets' times by up to 40%).
        for v in runners:
            fn = (lambda v=v: v.train_step(batches["train"])) if phase == "train" else (
                lambda v=v: v.sample_forward(batches["sample"]))
            with v.memory[phase].measure():
                fn()

    ref_out = None
    if "sample" in phases:
        ref = reference or next(v for v in runners if v.name == "faithful")
        if ref.output is None:
            ref.sample_forward(batches["sample"])
        ref_out = ref.output.float()

    results = []
    for v in runners:
        row = {"variant": v.name, "switches": v.cfg.describe(), "reason": v.cfg.reason}
        for phase in phases:
            med = statistics.median(v.times[phase])
            row[phase] = {
                "median_s": med,
                "times_s": v.times[phase],
                "gflops": flops[phase] / med / 1e9,
                "peak_mib": v.memory[phase].peak_bytes / 2**20,
                "first_call_s": v.first_call[phase],
            }
        if ref_out is not None:
            out = v.output.float()
            row["rel_err"] = ((out - ref_out).norm() / ref_out.norm()).item()
        row["compiled"] = fast.is_compiled(v.model) if v.cfg.compile_model else None
        results.append(row)
    add_ratios(results, phases)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "config": args.config,
        "model_flags": config["flags"],
        "num_params": num_params,
        "train_batch": train_batch_size,
        "sample_batch": sample_batch_size,
        "device": machine_description(device),
        "torch": th.__version__,
        "runs": args.runs,
        "timer": args.timer,
        "load_average_1min": load,
        "gflop": {k: v / 1e9 for k, v in flops.items()},
        "phases": phases,
        "results": results,
    }


def add_ratios(results: list[dict], phases: list[str]) -> None:
    """Each row's time ratio to the first row's, per phase: the median of the per-run ratios (run i
    of every variant ran back to back, so each ratio compares times taken under the same load)."""
    base_row = results[0]
    for row in results:
        for phase in phases:
            pairs = zip(row[phase]["times_s"], base_row[phase]["times_s"])
            row[phase]["ratio"] = statistics.median(a / b for a, b in pairs)
            row[phase]["ratio_of_medians"] = row[phase]["median_s"] / base_row[phase]["median_s"]


def run_isolated(args) -> dict:
    """
    `--isolate R`: every variant in its own process, R rounds with the variants alternating, so
    no variant runs on an allocator another one left behind (in one process the original's and
    the faithful path's 2 GB training steps took 5.3-8.0 s depending on their neighbours, 5.2-5.7 s
    alone). A process times `--runs` calls after `--warmup`; a variant's times are its
    per-round medians, and the ratios are medians of per-round ratios.
    """
    _, names = variant_names(args)
    child = []
    for key, value in vars(args).items():
        if key not in ("variants", "json", "isolate") and value not in ("", None):
            child += [f"--{key}", str(value)]
    reports = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.isolate):
            for name in names:
                out = os.path.join(tmp, f"{r}.json")
                proc = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), *child, "--variants", name,
                     "--json", out], capture_output=True, text=True)
                if proc.returncode != 0:
                    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                    raise SystemExit(f"--isolate: variant {name!r} failed: {last}")
                with open(out) as f:
                    reports[name].append(json.load(f))
    merged = dict(reports[names[0]][0], results=[], isolated_rounds=args.isolate)
    for name in names:
        rows = [rep["results"][0] for rep in reports[name]]
        row = dict(rows[0])
        for phase in merged["phases"]:
            times = [r[phase]["median_s"] for r in rows]
            row[phase] = dict(rows[0][phase], times_s=times, median_s=statistics.median(times),
                              gflops=merged["gflop"][phase] / statistics.median(times),
                              peak_mib=max(r[phase]["peak_mib"] for r in rows))
        merged["results"].append(row)
    add_ratios(merged["results"], merged["phases"])
    return merged


def format_table(report: dict) -> str:
    """The report as a markdown table (one row per variant)."""
    phases = report["phases"]
    rounds = report.get("isolated_rounds")
    timing = (f"each variant in its own process, {rounds} rounds of the median of "
              f"{report['runs']} runs" if rounds else f"medians of {report['runs']} interleaved runs")
    lines = [
        f"config {report['config']} ({report['num_params'] / 1e6:.1f}M params), "
        f"train batch {report['train_batch']}, sample batch {report['sample_batch']}; "
        f"{report['device']}; torch {report['torch']}; {timing} "
        f"({'CPU seconds of the process' if report['timer'] == 'cpu' else 'wall clock'}); "
        f"1-min load average at the end {report['load_average_1min']:.1f}",
        "FLOPs (FlopCounterMode, faithful model): "
        + ", ".join(
            f"{'training fwd+bwd' if p == 'train' else 'sampling forward'} "
            f"{report['gflop'][p]:.1f} GFLOP"
            for p in phases
        ),
        "",
    ]
    header = ["variant"]
    for p in phases:
        what = "train step" if p == "train" else "sample fwd"
        header += [f"{what} s", f"÷ {report['results'][0]['variant']}", "GFLOP/s", "peak MiB",
                   "1st call s"]
    if "sample" in phases:
        header.append("rel. err vs fp32")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in report["results"]:
        cells = [row["variant"]]
        for p in phases:
            r = row[p]
            cells += [f"{r['median_s']:.3f}", f"{r['ratio']:.2f}", f"{r['gflops']:.1f}",
                      f"{r['peak_mib']:.0f}", f"{r['first_call_s']:.2f}"]
        if "sample" in phases:
            cells.append(f"{row['rel_err']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for row in report["results"]:
        if row.get("reason"):
            lines.append(f"{row['variant']}: {row['switches']} ({row['reason']})")
    how = (f"median over {rounds} rounds (each variant in its own process) of the ratio of the "
           "per-process medians" if rounds else "median over runs of the time ratio within a run")
    lines.append(
        f"÷ {report['results'][0]['variant']}: {how}. "
        "peak MiB: CUDA allocator peak; on CPU, the peak RSS growth during the step. "
        "1st call includes one-off costs (torch.compile, kernel selection)."
    )
    if not rounds and any("malloc_cache" in row["switches"].split("+")
                          for row in report["results"]):
        lines.append("note: malloc_cache is process-wide, so every variant of this run ran with "
                     "it; --isolate R measures it.")
    if any(row.get("compiled") is False for row in report["results"]):
        lines.append("note: a compile variant fell back to eager (see the warning above).")
    return "\n".join(lines)


def create_argparser() -> argparse.ArgumentParser:
    return build_parser(__doc__.split("\n\n")[1], BenchmarkConfig)


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    threads = th.get_num_threads()
    if args.threads > 0:
        th.set_num_threads(args.threads)
    try:
        report = run_isolated(args) if args.isolate > 0 else run(args)
    finally:
        th.set_num_threads(threads)  # main() may run inside a test session
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
