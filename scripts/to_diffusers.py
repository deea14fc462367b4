"""
Export a checkpoint of this project as a diffusers folder: an ADM U-Net as `unet/`
(`UNet2DModel`), a DiT (`--model dit`) as `transformer/` (`DiTTransformer2DModel`), its diffusion
as `scheduler/` (`DDPMScheduler`: the same betas, variance and prediction types), plus
`model_index.json` (a `DDPMPipeline`) for an unconditional U-Net and our flags in
`guided_diffusion_args.json`. Pass the model's flags as for image_sample.py. The folder appears
complete or not at all; nothing is downloaded.

    python scripts/to_diffusers.py $MODEL_FLAGS --model_path run/ema_0.9999_100000.pt \\
        --output_dir exported
    # then: UNet2DModel.from_pretrained("exported", subfolder="unet")
"""

import argparse

from guided_diffusion import cli, diffusers_bridge
from guided_diffusion.config import (
    DiffusersExportConfig,
    DiffusionConfig,
    DiTConfig,
    LatentConfig,
    UNetConfig,
    build_parser,
)
from guided_diffusion.errors import ScriptError


def main():
    args = create_argparser().parse_args()
    if not args.output_dir:
        raise ScriptError("--output_dir is required (the diffusers folder to write)")
    cli.flags_from_run(args, "model_path")  # flags not given: the run's args.json, or preset
    kind = cli.model_kind(args)  # "unet" or "dit" (--model)
    model, _ = cli.build_model_and_diffusion(args)
    cli.load_checkpoint(model, args.model_path, "model_path")
    names = [*cli.MODEL_KINDS[kind].defaults(), "model", "latent_vae", "latent_scale"]
    flags = {k: getattr(args, k) for k in names if hasattr(args, k)}
    out = diffusers_bridge.export_to_diffusers(model.cpu(), flags, args.output_dir)
    print(f"wrote {out}: {diffusers_bridge.MODEL_FOLDERS[kind]}/ + scheduler/")


def create_argparser() -> argparse.ArgumentParser:
    return build_parser(__doc__, DiffusersExportConfig, UNetConfig, DiffusionConfig, DiTConfig,
                        LatentConfig)


if __name__ == "__main__":
    cli.run_main(main)
