"""Mixed-precision helpers.

`convert_module_to_f16/f32` are applied by `UNetModel.convert_to_fp16()` to the U-Net's input,
middle and output blocks only; as in the original they touch just the convolutions' weights and
biases, so GroupNorm (which computes in float32 anyway) and Linear layers stay float32.
"""

import torch.nn as nn

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
