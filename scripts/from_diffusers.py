"""
Bring a diffusers folder back as a checkpoint of this project: FOLDER holds `unet/`
(`UNet2DModel`) or `transformer/` (`DiTTransformer2DModel`) with safetensors weights (a pickled
.bin is never loaded) and `scheduler/`. Writes `--output` (.pt, atomically) and `args.json`
beside it with the flags that rebuild the model and its diffusion (the flags a folder from
to_diffusers.py carries in `guided_diffusion_args.json` are used where the configs cannot tell).

    python scripts/from_diffusers.py exported --output back/model.pt
    python scripts/image_sample.py --model_path back/model.pt  # the model flags: its args.json
"""

import argparse
import os

from guided_diffusion import cli, diffusers_bridge
from guided_diffusion.checkpoints import save_run_flags
from guided_diffusion.config import DiffusersImportConfig, build_parser
from guided_diffusion.errors import ScriptError
from guided_diffusion.fileio import save_atomic


def main():
    args = create_argparser().parse_args()
    if not args.output:
        raise ScriptError("--output is required (the checkpoint to write, .pt)")
    run_dir = os.path.dirname(os.path.abspath(args.output))
    for path in (args.output, os.path.join(run_dir, "args.json")):
        if os.path.exists(path):
            raise ScriptError(f"--output: {path} exists; write into a new folder (nothing "
                                  "is overwritten)")
    try:
        diffusers_bridge.require_diffusers()
        folder = diffusers_bridge.read_diffusers_folder(args.folder)
        spec = cli.MODEL_KINDS[folder.kind]
        flags = {**spec.defaults(), **{k: v for k, v in folder.flags.items()
                                       if k in spec.defaults()}}
        model, _ = spec.factory(in_channels=folder.in_channels, **flags)
        sub = f"{args.folder}/{diffusers_bridge.MODEL_FOLDERS[folder.kind]}"
        diffusers_bridge.check_config(model, folder.config, sub)
        weights = diffusers_bridge.from_diffusers_state_dict(
            model, folder.state_dict, source=sub)
    except ValueError as e:  # BridgeError, or flags the factory refuses
        raise ScriptError(str(e)) from e
    model.load_state_dict(weights, strict=True)  # every tensor, every shape
    save_atomic(model.state_dict(), args.output)
    # The flags that rebuild it; other folder flags (e.g. --latent_vae) ride along.
    extra = {k: v for k, v in folder.flags.items() if k not in flags}
    save_run_flags({**flags, **extra}, run_dir)
    print(f"wrote {args.output} and {os.path.join(run_dir, 'args.json')}")
    if folder.in_channels != 3 and not folder.flags.get("latent_vae"):
        print(f"note: the model has {folder.in_channels} input channels (latents): sample it "
              "with --latent_vae pointing at the VAE it was trained with")


def create_argparser() -> argparse.ArgumentParser:
    parser = build_parser(__doc__, DiffusersImportConfig)
    parser.add_argument("folder", help="the diffusers folder (unet/ or transformer/, scheduler/)")
    return parser


if __name__ == "__main__":
    cli.run_main(main)
