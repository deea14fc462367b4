"""The fast path: switches that trade bit-exactness with the original for speed.

Each switch works alone; `--fast True` turns on the preset chosen for the device the model runs
on (`hardware.choose_switches`: bf16 only where the hardware has bf16 instructions or tensor
cores) and logs what it chose and why in one line.
Nothing here is on by default: without these flags the model computes exactly what the original
computes (the golden fixtures check it), so every speed-up is opt-in and measured against that
faithful path by `scripts/benchmark.py`.

- `use_bf16`: run the forward (and backward) under `torch.autocast(dtype=bfloat16)`. Convolutions
  and matmuls run in bfloat16 with float32 accumulation; GroupNorm takes bfloat16 inputs as they
  are (`AutocastGroupNorm32`; its statistics are still accumulated in float32), and the weights,
  optimizer state and the diffusion's arithmetic stay float32. Unlike the
  original's fp16 (`use_fp16`, CUDA only), bfloat16 has float32's exponent range, so no loss
  scaling is needed, and it works on CPUs with AVX512-BF16/AMX as well as on GPUs.
- `use_sdpa`: attention through `torch.nn.functional.scaled_dot_product_attention` (fused /
  flash kernels) instead of the original's einsum + softmax, for both attention orders.
- `channels_last`: NHWC memory format for parameters and activations, the layout the oneDNN (CPU)
  and cuDNN (tensor-core) convolution kernels prefer.
- `compile_model`: `torch.compile` the model's forward, falling back to eager (with a warning
  or dynamo's log line that says why) when no compiler is available or compilation fails.
- `fused_blocks`: GroupNorm + SiLU in one call with the activation in place, AdaGN's scale and
  shift folded into the norm's affine, and attention computed on [N x T x C] views of the
  activations (no layout copies under channels_last). Same function, different rounding
  (tests/test_fast.py states the tolerance).
- `fused_adam`: training's AdamW step as PyTorch's fused kernel (`fused=True`: one pass over each
  tensor instead of a dozen elementwise ops per parameter; on CPU a third of the step's time).
  Same update, different rounding; the faithful path keeps the original's AdamW.
- `malloc_cache` (CPU, glibc): the process's malloc keeps freed memory for reuse instead of
  handing it back to the OS. By default every activation above glibc's mmap threshold is a fresh
  mapping that the kernel zero-fills page by page, on every step (~100k page faults per bench64
  sampling forward); with the thresholds raised the next step reuses the same pages. Process-wide
  and bit-exact; the resident memory stays at its peak, as a GPU's caching allocator does. Not in
  the preset: the page faults go, but no wall-clock gain stood out of the noise here (README).
TF32 for what stays float32 on CUDA >= 8.0 is not a fast-path switch: `--tf32` (on by default,
`dist_util.cuda_settings`) sets it for every script.

Wiring in a script is three lines::

    fast_cfg = fast.resolve_fast_flags(vars(args), device)
    model = fast.apply_fast_path(model, **fast_cfg.model_kwargs())
    with fast.autocast_context(device, fast_cfg.use_bf16):
        ...  # forward / training_losses
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import types
import warnings
from typing import Any, Collection, Mapping

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from . import dist_util, hardware, logger
from .config import FastConfig, defaults, given_flags
from .errors import ScriptError
from .nn import GroupNorm32


def fast_defaults() -> dict:
    """Defaults of the fast-path flags (`config.FastConfig`; all off = the faithful path)."""
    return defaults(FastConfig)


@dataclasses.dataclass(frozen=True)
class FastPathConfig:
    """The resolved switches (after expanding the `fast` preset for the device)."""

    use_bf16: bool = False  # bfloat16 autocast around forward and backward
    use_sdpa: bool = False  # fused scaled_dot_product_attention in every attention block
    channels_last: bool = False  # NHWC memory format for weights and activations
    compile_model: bool = False  # torch.compile of the model's forward (falls back to eager)
    fused_blocks: bool = False  # GroupNorm+SiLU(+AdaGN) in one pass; attention without copies
    fused_adam: bool = False  # AdamW's fused kernel (training)
    malloc_cache: bool = False  # glibc keeps freed memory for reuse (CPU; process-wide)
    use_fp16: bool = False  # the original's fp16 weights and loss scaling (CUDA)
    reason: str = dataclasses.field(default="", compare=False)  # why the preset chose these

    def model_kwargs(self) -> dict:
        """The keyword arguments of `apply_fast_path` (fp16 conversion is the loader's job; the
        optimizer's switch, `fused_adam`, is the training loop's)."""
        return dict(
            use_bf16=self.use_bf16,
            use_sdpa=self.use_sdpa,
            channels_last=self.channels_last,
            compile_model=self.compile_model,
            fused_blocks=self.fused_blocks,
            malloc_cache=self.malloc_cache,
        )

    def describe(self) -> str:
        on = [f.name for f in dataclasses.fields(self) if f.name != "reason" and getattr(self, f.name)]
        return "+".join(on) if on else "faithful"

    def log_line(self) -> str:
        """One line for the run's log: what runs, and why when the preset chose it."""
        return f"fast path: {self.describe()}" + (f" ({self.reason})" if self.reason else "")


def resolve_fast_flags(
    flags: Mapping[str, Any] | Any,
    device: th.device | str | None = None,
    facts: hardware.DeviceFacts | None = None,
    given: Collection[str] | None = None,
) -> FastPathConfig:
    """Turn parsed flags (a dict or an argparse Namespace) into a `FastPathConfig`.

    `fast=True` adds the preset `hardware.choose_switches` picks for the device. Switches given
    explicitly win over it both ways: given True they stay on whatever the preset says and pick
    the precision (with `--use_fp16 True` the preset adds no bf16, with `--use_bf16 True` no
    fp16); given False (`--fast True --channels_last False`) the preset leaves them off.

    :param flags: must contain the keys of `fast_defaults()`; `use_fp16` is read if present.
    :param device: where the model runs (default CPU); its facts are detected unless given.
    :param facts: the device's facts (tests fake them; default `hardware.detect(device)`).
    :param given: the flags the command line gave (`config.given_flags`); None = unknown, and a
                  switch's False then reads as its default. `use_fp16` given False does not
                  veto the preset's fp16 (sampling scripts take that flag from the run).
    """
    if not isinstance(flags, Mapping):
        flags = vars(flags)
    missing = [k for k in fast_defaults() if k not in flags]
    if missing:
        raise KeyError(
            f"fast-path flags missing: {missing} (build the parser from fast_defaults())"
        )
    chosen = {k: bool(flags[k]) for k in fast_defaults() if k != "fast"}
    chosen["use_fp16"] = bool(flags.get("use_fp16", False))
    if chosen["use_bf16"] and chosen["use_fp16"]:
        raise ValueError(
            "--use_bf16 True and --use_fp16 True are alternatives (bf16 autocast vs the original's "
            "fp16 weights); pick one"
        )
    reason = ""
    if flags["fast"]:
        if facts is None:
            facts = hardware.detect(device if device is not None else "cpu")
        preset, reason = hardware.choose_switches(facts)
        explicit_precision = chosen["use_bf16"] or chosen["use_fp16"]
        # Only this project's switches: use_fp16 is a model flag, also "given" when a sampling
        # script takes it from the run's args.json, so its False never vetoes the preset.
        turned_off = [k for k in chosen if k != "use_fp16" and k in (given or ()) and not chosen[k]]
        for key, value in preset.items():
            if key in turned_off or (key in ("use_bf16", "use_fp16") and explicit_precision):
                continue  # the user's switch, or the user's precision, wins
            chosen[key] = chosen[key] or value
        forced = [k for k in ("use_bf16", "use_fp16") if chosen[k] and not preset.get(k)]
        if forced:
            reason += f"; --{forced[0]} True given"
        kept_off = [k for k in turned_off if preset.get(k)]
        if kept_off:
            reason += "; " + " ".join(f"--{k} False" for k in kept_off) + " given"
    kind = th.device(device).type if device is not None else None
    if chosen["use_bf16"] and kind is not None and kind not in ("cpu", "cuda"):
        raise ValueError(f"--use_bf16 True needs a CPU or CUDA device, got {device}")
    return FastPathConfig(**chosen, reason=reason)


def autocast_context(device: th.device | str, use_bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on `device` if `use_bf16`, else a no-op context.

    Autocast runs convolutions and matmuls in bfloat16 and keeps reductions such as softmax and
    the losses in float32; the model's own GroupNorm32 normalizes in float32 regardless.
    """
    if not use_bf16:
        return contextlib.nullcontext()
    return th.autocast(device_type=th.device(device).type, dtype=th.bfloat16)


def _set_flag(model: nn.Module, attr: str, enabled: bool) -> int:
    """Set `attr` on every module of `model` that has it; return how many there were."""
    modules = [m for m in model.modules() if hasattr(m, attr)]
    for module in modules:
        setattr(module, attr, enabled)
    return len(modules)


def set_sdpa(model: nn.Module, enabled: bool = True) -> int:
    """Switch every attention module of `model` (those with a `use_sdpa` attribute).

    :return: how many modules were switched (0 for a model without attention).
    """
    return _set_flag(model, "use_sdpa", enabled)


def set_fused(model: nn.Module, enabled: bool = True) -> int:
    """Switch the fused forward of every block of `model` that has one (a `fused` attribute).

    :return: how many blocks were switched.
    """
    return _set_flag(model, "fused", enabled)


class AutocastGroupNorm32(GroupNorm32):
    """GroupNorm32 that normalizes bfloat16 inputs without first copying them to float32.

    The faithful GroupNorm32 casts its input to float32 and the result back, two full copies of
    every activation that, under bf16 autocast on CPU, cost as much time as the normalization
    itself. PyTorch's group_norm kernels accumulate the mean and variance of bfloat16 inputs in
    float32 anyway, so only the output's rounding to bfloat16 differs. (On CUDA, autocast runs
    group_norm in float32 regardless.) float32 and float16 inputs take the faithful route.
    """

    def forward(self, x: th.Tensor) -> th.Tensor:
        if x.dtype == th.bfloat16:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def use_autocast_norms(model: nn.Module, enabled: bool = True) -> int:
    """Switch every GroupNorm32 of `model` to (or back from) `AutocastGroupNorm32`.

    Only the class changes: parameters, state_dict names and hooks stay as they are.
    :return: how many norms were switched.
    """
    src, dst = (GroupNorm32, AutocastGroupNorm32) if enabled else (AutocastGroupNorm32, GroupNorm32)
    count = 0
    for module in model.modules():
        if type(module) is src:
            module.__class__ = dst
            count += 1
    return count


def compiler_problem(device: th.device | str) -> str | None:
    """Why inductor cannot compile for `device` here, or None if it should.

    Inductor writes C++ kernels for CPU tensors and Triton kernels for CUDA tensors. Checked up
    front: otherwise the failure is a long log at the first forward.
    """
    kind = th.device(device).type
    compilers = (os.environ.get("CXX"), "g++", "clang++", "c++")
    if kind == "cpu" and not any(c and shutil.which(c) for c in compilers):
        return "no C++ compiler found (inductor needs g++ or clang++ on PATH, or $CXX)"
    if kind == "cuda" and importlib.util.find_spec("triton") is None:
        return "the 'triton' package is missing (inductor needs it for CUDA kernels)"
    return None


def apply_fast_path(
    model: nn.Module,
    *,
    use_bf16: bool = False,
    use_sdpa: bool = False,
    channels_last: bool = False,
    compile_model: bool = False,
    compile_mode: str | None = None,
    fused_blocks: bool = False,
    malloc_cache: bool = False,
) -> nn.Module:
    """Apply the model-side switches in place and return the model (same object, same state_dict).

    Apply it after loading weights and `convert_to_fp16()`. bf16 autocast itself is not a model
    property: wrap the forward (and the loss) in `autocast_context`.

    :param model: a UNetModel, SuperResModel or EncoderUNetModel (any nn.Module works).
    :param use_bf16: the model will run under bf16 autocast: let its norms take bf16 inputs
                     natively (`AutocastGroupNorm32`); a no-op for float32 inputs.
    :param use_sdpa: fused scaled_dot_product_attention in every attention block.
    :param channels_last: convert parameters to NHWC and feed the first convolution NHWC.
    :param compile_model: torch.compile the forward; on failure, stay eager and say why.
    :param compile_mode: passed to torch.compile (None, "reduce-overhead", "max-autotune", ...).
    :param fused_blocks: the fused forward of every ResBlock and AttentionBlock (`set_fused`).
    :param malloc_cache: for a model on the CPU, `hardware.keep_freed_memory()` (process-wide).
    """
    if malloc_cache and next(model.parameters()).device.type == "cpu":
        problem = hardware.keep_freed_memory()
        if problem is not None:
            warnings.warn(f"--malloc_cache True: {problem}; the allocator is unchanged")
    if fused_blocks:
        set_fused(model, True)  # a model without U-Net blocks (DiT) has none to switch
    if use_bf16:
        use_autocast_norms(model, True)
    if use_sdpa:
        if set_sdpa(model, True) == 0:
            warnings.warn("--use_sdpa True: the model has no attention blocks; nothing to switch")
    if channels_last:
        # 4-D parameters (conv weights) become NHWC; a convolution with an NHWC weight returns
        # NHWC activations, so the layout then propagates through the network on its own.
        model.to(memory_format=th.channels_last)
    if compile_model:
        problem = compiler_problem(next(model.parameters()).device)
        if problem is not None:
            warnings.warn(f"--compile_model True: {problem}; running the model eagerly instead")
            return model
        # Compiler failures surface lazily, at the first forward (a missing header, a backend
        # bug): dynamo's suppress_errors runs that frame eagerly instead and logs why. It is
        # process-wide, which is what a script that asked for --compile_model wants.
        import torch._dynamo  # not loaded by `import torch` alone

        torch._dynamo.config.suppress_errors = True
        try:
            compiled = th.compile(type(model).forward, mode=compile_mode)
        except Exception as exc:  # noqa: BLE001 - any failure means "run eagerly", with the reason
            warnings.warn(f"--compile_model True: torch.compile failed ({exc!r}); running eagerly")
            return model
        # Bound to this model: a deep copy (e.g. an EMA model) rebinds the method to the copy.
        model.forward = types.MethodType(compiled, model)
    return model


def is_compiled(model: nn.Module) -> bool:
    """True if `apply_fast_path` compiled this model's forward."""
    return isinstance(model.__dict__.get("forward"), types.MethodType)


# ------------------------------------------------------------------------------------------------
# From a script's flags


def fast_config(args, fp16_flag: str = "use_fp16") -> FastPathConfig:
    """
    The fast-path switches of the flags, `--fast True` resolved for this process's device
    (`hardware.choose_switches`); with a parser without fast-path flags only the fp16 flag counts.
    Its `use_fp16` is the precision to load, sample and train in: the flag, or the preset's
    choice on CUDA below compute capability 8.0.
    """
    if not all(hasattr(args, k) for k in fast_defaults()):
        return FastPathConfig(use_fp16=bool(getattr(args, fp16_flag, False)))
    flags = dict(vars(args), use_fp16=bool(getattr(args, fp16_flag, False)))
    try:
        return resolve_fast_flags(flags, dist_util.dev(), given=given_flags(args))
    except ValueError as e:
        raise ScriptError(str(e)) from e


def apply_fast_flags(args, model: th.nn.Module, fp16_flag: str = "use_fp16") -> FastPathConfig:
    """
    Resolve the script's fast-path flags, apply them to `model` (in place, `apply_fast_path`)
    and return the resolved switches.

    Call it after loading weights and converting to fp16; wrap forwards in
    `autocast_context(dist_util.dev(), cfg.use_bf16)` (TrainLoop does so given use_bf16).
    """
    cfg = fast_config(args, fp16_flag)
    apply_fast_path(model, **cfg.model_kwargs())
    if cfg.describe() != "faithful":
        logger.log(cfg.log_line())  # what the preset chose on this device, and why
    return cfg
