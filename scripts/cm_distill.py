"""
Distil a trained diffusion model (the teacher, `--teacher_path` with its model and diffusion
flags) into a consistency model that samples in one or a few steps (Song et al. 2023, "Consistency
Models", Algorithm 2). The student starts from the teacher's weights; `--teacher_solver` steps the
teacher's ODE between `--cm_steps` points of its grid, `--target_ema` is the target network's EMA.
`--training_mode consistency_training` needs no teacher (`--teacher_path` then only initialises);
iCT's recipe adds `--cm_curriculum ict --cm_noise_dist lognormal --cm_weighting inverse_step`
(N doubles over `--lr_anneal_steps` from `--cm_steps` + 1 to `--cm_steps_max` + 1; README).

Writes `model/ema_*/opt/target{step:06d}.pt` and `args.json` to `--output_dir`; sample the student
(or an EMA) with `image_sample.py --sampler consistency --steps K --model_path OUT/model*.pt`.
Run on several processes with `torchrun --nproc_per_node=K` or `mpiexec -n K`.
"""

import argparse
import copy

from guided_diffusion import checkpoints, cli, config, logger
from guided_diffusion.cm_train import CMTrainLoop


def main():
    args = create_argparser().parse_args()
    cm = config.from_flags(config.ConsistencyConfig, args)
    distil = cm.training_mode == "consistency_distillation"
    if distil or args.teacher_path:
        cli.require_path(args.teacher_path, "teacher_path")
        check_teacher(args)  # before the lock and args.json: a refused command writes nothing
    cli.require_path(args.data_dir, "data_dir", kind="dir")
    # The run lock, temp cleanup and resume-flag check; args.json marks the run's checkpoints as
    # consistency models (its training_mode) for the sampling scripts' --sampler check.
    if not cli.start_training(args, "unet"):
        return

    logger.log("creating the student from the teacher...")
    model, diffusion = cli.build_model_and_diffusion(args, "unet")
    if args.teacher_path:
        cli.load_checkpoint(model, args.teacher_path, "teacher_path")
    teacher = None
    if distil:
        teacher = copy.deepcopy(model).requires_grad_(False)
        if cli.fast_config(args).use_fp16:  # --use_fp16, or --fast on CUDA < 8.0
            teacher.convert_to_fp16()
        teacher.eval()  # only evaluated: no dropout, no label dropout
        cli.apply_fast_flags(args, teacher)

    data = cli.training_data(args)  # every data flag: --seed, --num_classes, --skip_bad_images
    try:
        cli.train_diffusion(args, model, diffusion, data,
                            loop=CMTrainLoop, teacher=teacher, cm=cm)
    except ValueError as e:  # a bad consistency flag (named in the message)
        raise cli.ScriptError(str(e)) from e


def check_teacher(args) -> None:
    """
    A consistency student (cm_distill.py's own output) is no teacher: its network no longer
    predicts the diffusion's x_0. (The teacher's model and diffusion flags are compared with its
    run's args.json by `cli.start_training`: `training_flags`.)
    """
    if checkpoints.is_consistency_checkpoint(args.teacher_path):
        raise cli.ScriptError(
            f"--teacher_path {args.teacher_path!r} is a consistency model (its args.json has "
            "a consistency training_mode): distil from the diffusion model it came from")


def create_argparser() -> argparse.ArgumentParser:
    return config.build_parser(
        __doc__, config.ConsistencyConfig, config.DataConfig,
        # lr 5e-4, measured on the digits (README): 1-step toy FID 0.33 against 0.37 at 1e-4.
        config.TrainingConfig(lr=5e-4),
        config.UNetConfig, config.DiffusionConfig, config.CommonConfig, config.FastConfig,
        config.PresetConfig,
    )


if __name__ == "__main__":
    cli.run_main(main)
