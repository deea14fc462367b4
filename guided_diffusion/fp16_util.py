"""Mixed-precision helpers.

`convert_module_to_f16/f32` are applied by `UNetModel.convert_to_fp16()` to the U-Net's input,
middle and output blocks only; as in the original they touch just the convolutions' weights and
biases, so GroupNorm (which computes in float32 anyway) and Linear layers stay float32.
"""

import contextlib
import math

import torch as th
import torch.nn as nn

from . import logger

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module: nn.Module) -> None:
    """Cast a convolution's parameters to float16 (no-op for any other module)."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module: nn.Module) -> None:
    """Undo `convert_module_to_f16`."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


# ----------------------------------------------------------------------------------------------
# Mixed-precision training: float32 master weights with dynamic loss scaling (fp16), or bf16
# autocast. Micikevicius et al. 2018, "Mixed Precision Training".
# ----------------------------------------------------------------------------------------------

# The loss is multiplied by 2**lg_loss_scale before backward so small fp16 gradients do not flush
# to zero; the original starts at 2**20 and grows the exponent by fp16_scale_growth per good step.
INITIAL_LOG_LOSS_SCALE = 20.0
# Non-finite gradients even at scale 2**0 = 1 cannot be cured by scaling further down.
MIN_LOG_LOSS_SCALE = 0.0


def _norm(tensors: list) -> th.Tensor:
    """The L2 norm of all `tensors` together, as a float32 0-dim tensor (one device sync later)."""
    if not tensors:
        return th.zeros(())
    per_tensor = [th.linalg.vector_norm(t.detach(), dtype=th.float32) for t in tensors]
    return th.linalg.vector_norm(th.stack(per_tensor))


class MixedPrecisionTrainer:
    """
    Owns a model's backward pass and optimizer step in fp32, fp16 or bf16.

    * fp32 (default): the optimizer updates the model's own parameters.
    * fp16 (`use_fp16`): the model's convolutions run in float16 (`model.convert_to_fp16()`);
      the optimizer updates float32 *master* copies. The loss is scaled by 2**lg_loss_scale;
      every gradient is unscaled before the step (the original unscaled only its first
      parameter group until its last commit); a step with non-finite gradients is skipped and
      the scale halved; the scale never goes below 1 (a RuntimeError says the model diverged).
    * bf16 (`use_bf16`): float32 weights, the forward runs under `torch.autocast(bfloat16)` (use
      `with trainer.autocast():`). bf16 has float32's exponent range, so no loss scaling.

    Build the optimizer over `trainer.master_params`.

    :param model: the module to train (not wrapped in DDP; DDP may wrap it afterwards).
    :param fp16_scale_growth: added to lg_loss_scale after every successful fp16 step.
    :param initial_lg_loss_scale: log2 of the starting loss scale.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        use_fp16: bool = False,
        fp16_scale_growth: float = 1e-3,
        initial_lg_loss_scale: float = INITIAL_LOG_LOSS_SCALE,
        use_bf16: bool = False,
        min_lg_loss_scale: float = MIN_LOG_LOSS_SCALE,
    ):
        if use_fp16 and use_bf16:
            raise ValueError("use_fp16 and use_bf16 are exclusive: pick one precision")
        self.model = model
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.fp16_scale_growth = fp16_scale_growth
        self.min_lg_loss_scale = min_lg_loss_scale
        self.lg_loss_scale = initial_lg_loss_scale
        self.param_names = [name for name, _ in model.named_parameters()]
        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        if self.use_fp16:
            # Float32 copies taken before the conversion, so nothing is lost to rounding.
            self.master_params = [
                nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
                for p in self.model_params
            ]
            model.convert_to_fp16()

    def autocast(self):
        """The context for the forward pass: bf16 autocast in bf16 mode, else nothing."""
        if not self.use_bf16:
            return contextlib.nullcontext()
        device_type = self.model_params[0].device.type if self.model_params else "cpu"
        return th.autocast(device_type=device_type, dtype=th.bfloat16)

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None

    def backward(self, loss: th.Tensor) -> None:
        """Backpropagate `loss` (scaled by 2**lg_loss_scale in fp16 mode) into the model's grads."""
        if self.use_fp16:
            (loss * 2**self.lg_loss_scale).backward()
        else:
            loss.backward()

    def optimize(self, opt: th.optim.Optimizer) -> bool:
        """Take an optimizer step from the model's gradients; False if it was skipped (fp16)."""
        if self.use_fp16:
            return self._optimize_fp16(opt)
        return self._optimize_normal(opt)

    def _optimize_fp16(self, opt: th.optim.Optimizer) -> bool:
        logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        scale = 2**self.lg_loss_scale
        for master, p in zip(self.master_params, self.model_params):
            # Unscale every gradient, in float32 (the fp16 gradient may be near its max).
            master.grad = None if p.grad is None else p.grad.float() / scale
        grad_norm, param_norm = self._compute_norms()
        if not math.isfinite(grad_norm):
            self.lg_loss_scale -= 1
            self._zero_master_grads()
            if self.lg_loss_scale < self.min_lg_loss_scale:
                raise RuntimeError(
                    f"non-finite gradients (norm {grad_norm}) at loss scale "
                    f"2**{self.lg_loss_scale + 1:.3f}, and scaling the loss below 1 cannot cure "
                    "an overflow: the model or loss has diverged (NaN/inf weights or inputs); "
                    "lower --lr or check the data"
                )
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            return False
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        opt.step()
        self._zero_master_grads()
        with th.no_grad():
            for master, p in zip(self.master_params, self.model_params):
                p.copy_(master)  # copy_ casts float32 -> the model's dtype
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def _optimize_normal(self, opt: th.optim.Optimizer) -> bool:
        grad_norm, param_norm = self._compute_norms()
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        opt.step()
        return True

    def _zero_master_grads(self) -> None:
        for p in self.master_params:
            p.grad = None

    def _compute_norms(self) -> tuple:
        """(grad_norm, param_norm) over the master parameters, as Python floats."""
        grads = [p.grad for p in self.master_params if p.grad is not None]
        norms = th.stack([_norm(grads).cpu(), _norm(self.master_params).cpu()])
        grad_norm, param_norm = norms.tolist()
        return grad_norm, param_norm

    def master_params_to_state_dict(self, master_params: list) -> dict:
        """
        A float32 state_dict of the model with `master_params` (or an EMA of them) as its
        parameters: the layout the original saves and its released checkpoints use.
        """
        state_dict = self.model.state_dict()
        for name, p in zip(self.param_names, master_params):
            state_dict[name] = p.detach().float()
        return {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}

    def state_dict_to_master_params(self, state_dict: dict) -> list:
        """The float32 tensors of `state_dict` in `master_params` order (e.g. a saved EMA)."""
        missing = [name for name in self.param_names if name not in state_dict]
        if missing:
            raise KeyError(
                f"state_dict lacks {len(missing)} of the model's {len(self.param_names)} "
                f"parameters, e.g. {missing[:3]}"
            )
        return [state_dict[name].detach().float() for name in self.param_names]

    def load_master_state_dict(self, state_dict: dict) -> None:
        """Load float32 weights into the model and, in fp16 mode, into the master copies."""
        self.model.load_state_dict(state_dict)
        if self.use_fp16:
            with th.no_grad():
                for master, value in zip(self.master_params, self.state_dict_to_master_params(state_dict)):
                    master.copy_(value)

    def state_dict(self) -> dict:
        """The resume state beyond the weights: plain Python values."""
        return {"lg_loss_scale": float(self.lg_loss_scale), "use_fp16": self.use_fp16,
                "use_bf16": self.use_bf16}

    def load_state_dict(self, state: dict) -> None:
        if "lg_loss_scale" in state:
            self.lg_loss_scale = float(state["lg_loss_scale"])
