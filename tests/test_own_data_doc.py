"""docs/own-data.md's commands work: each parses with its script; the fine-tuning flags build the
released 64x64 checkpoint's exact layout (golden names and shapes); and the whole page runs at
tiny scale in order: flatten a class-folder tree, dry-run, train from scratch, fine-tune from a
checkpoint in the released layout's format (the same flags, shrunk)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion import cli, logger, script_util

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own-data.md"
LAYOUTS = ROOT / "tests" / "fixtures" / "golden" / "released_checkpoint_layouts.json"
# Sizes that keep the page's commands to seconds on a CPU (value replaced, flag kept).
SHRINK = {
    "--image_size": "16", "--num_channels": "32", "--num_res_blocks": "1",
    "--attention_resolutions": "8", "--num_head_channels": "16", "--diffusion_steps": "4",
    "--batch_size": "2", "--microbatch": "1", "--use_fp16": "False", "--save_interval": "2",
    "--sample_interval": "2",
}
EXTRA = ["--channel_mult", "1,2", "--lr_anneal_steps", "2", "--log_interval", "1"]


def doc_commands() -> list[list[str]]:
    """The argv of every command in the page's ```sh blocks, with NAME="..." expanded."""
    env, commands, fence = {}, [], False
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            fence = line.startswith("```sh") and not fence
            continue
        if not fence:
            continue
        m = re.fullmatch(r'([A-Z][A-Z0-9_]*)="(.*)"', line)
        if m:
            env[m.group(1)] = m.group(2)
            continue
        expanded = re.sub(r"\$([A-Z][A-Z0-9_]*)", lambda v: env[v.group(1)], line)
        commands.append(shlex.split(expanded))
    return commands


def script_argv(argv: list[str]) -> tuple[str, list[str]]:
    """(script path, its flags) of a `python script ...` or `torchrun ... script ...` command."""
    i = next(k for k, a in enumerate(argv) if a.endswith(".py"))
    return argv[i], argv[i + 1 :]


def load_script(path: str):
    spec = importlib.util.spec_from_file_location(f"doc_{pathlib.Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the script's dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def parse(path: str, flags: list[str]):
    args, unknown = load_script(path).create_argparser().parse_known_args(flags)
    assert not unknown, f"{path} has no flags {unknown}"
    return args


def test_every_command_parses_and_fine_tuning_builds_the_released_64x64_layout():
    commands = doc_commands()
    assert [a[0] for a in commands] == ["python"] * 4 + ["torchrun"] + ["python"] * 3
    train = [script_argv(a) for a in commands if "image_train.py" in " ".join(a)]
    assert len(train) == 5
    for path, flags in train:
        parse(path, flags)
    fine_tune = parse(*train[2])
    assert fine_tune.init_checkpoint == "models/64x64_diffusion.pt"
    defaults = script_util.model_and_diffusion_defaults()
    with th.device("meta"):
        model, _ = script_util.create_model_and_diffusion(
            **script_util.args_to_dict(fine_tune, defaults.keys()))
    golden = json.loads(LAYOUTS.read_text())["64x64_diffusion.pt"]["tensors"]
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == golden


def shrink(flags: list[str], paths: dict[str, str]) -> list[str]:
    out = []
    for i, a in enumerate(flags):
        prev = flags[i - 1] if i else ""
        if prev in SHRINK:
            a = SHRINK[prev]
        for old, new in paths.items():
            if a.startswith(old):
                a = new + a[len(old) :]
        out.append(a)
    return out


def run_script(path: str, flags: list[str], monkeypatch) -> None:
    module = load_script(path)
    monkeypatch.setattr(sys, "argv", [path, *flags])
    for var in ("OPENAI_LOGDIR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GD_FAULT"):
        monkeypatch.delenv(var, raising=False)
    try:
        cli.run_main(module.main)
    finally:
        logger.reset()


def test_the_page_runs_end_to_end_at_tiny_scale(tmp_path, monkeypatch, capsys):
    th.set_num_threads(1)
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / cls / f"{i}.png")
    paths = {p: f"{tmp_path}/{p}" for p in ("photos/", "data/", "runs/", "models/")}
    flatten, dry, scratch, fine_tune, torchrun, *_ = doc_commands()

    # 1. Flatten (a plain script: run it as the page does).
    path, flags = script_argv(flatten)
    subprocess.run([sys.executable, path, *shrink(flags, paths)], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert sorted(os.listdir(tmp_path / "data" / "photos_64"))[:2] == [
        "cat_0000000.png", "cat_0000001.png"]

    # 2. Dry run: prints the cost, trains nothing.
    path, flags = script_argv(dry)
    run_script(path, shrink(flags, paths) + EXTRA, monkeypatch)
    out = capsys.readouterr().out
    assert "parameters" in out and "GFLOPs" in out and "GiB in all" in out, out
    assert not (tmp_path / "runs").exists()

    # 3. From scratch: checkpoints, a sample grid and a loss plot.
    path, flags = script_argv(scratch)
    run_script(path, shrink(flags, paths) + EXTRA, monkeypatch)
    run = tmp_path / "runs" / "photos"
    for name in ("model000002.pt", "ema_0.9999_000002.pt", "samples_000002.png", "loss.png"):
        assert (run / name).exists(), name

    # 4. Fine-tune: a checkpoint in the released layout's format (these flags, shrunk), loaded as
    # weights only: training starts at step 0 with a fresh optimizer.
    path, flags = script_argv(fine_tune)
    flags = shrink(flags, paths) + EXTRA
    args = parse(path, flags)
    defaults = script_util.model_and_diffusion_defaults()
    th.manual_seed(5)
    released, _ = script_util.create_model_and_diffusion(
        **script_util.args_to_dict(args, defaults.keys()))
    (tmp_path / "models").mkdir()
    th.save(released.state_dict(), tmp_path / "models" / "64x64_diffusion.pt")
    run_script(path, flags, monkeypatch)
    run = tmp_path / "runs" / "photos_ft"
    log = (run / "log.txt").read_text()
    assert "initializing the model from" in log and "loading model from checkpoint" not in log
    opt = th.load(run / "opt000002.pt", weights_only=True)
    assert opt["resume"]["step"] == 2
    assert all(int(s["step"]) == 2 for s in opt["state"].values())  # AdamW started afresh
    tuned = th.load(run / "model000002.pt", weights_only=True)
    start = released.state_dict()
    assert any(not th.equal(tuned[k], start[k]) for k in start)
    # Rerunning the same command resumes this run (auto wins over --init_checkpoint).
    flags[flags.index("--lr_anneal_steps") + 1] = "3"
    run_script(path, flags, monkeypatch)
    assert "loading model from checkpoint" in (run / "log.txt").read_text()
    assert (run / "model000003.pt").exists()

    # 5. The multi-GPU command: the script accepts its flags (two-rank runs: test_resilience).
    path, flags = script_argv(torchrun)
    assert parse(path, flags).dist_timeout == 600
    assert torchrun[1:5] == ["--nproc_per_node", "8", "--max-restarts", "3"]


def test_the_imagenet_section_runs_at_tiny_scale(tmp_path, monkeypatch):
    """Section 6: a synthetic ImageNet-layout folder, the data benchmark on it, and the training
    command (shrunk) on it: the index goes to --data_index, and a second start reuses it."""
    th.set_num_threads(1)
    logger.reset()  # the default logger of an earlier test may hold that test's closed stdout
    train, make, bench = doc_commands()[-3:]
    paths = {p: f"{tmp_path}/{p}" for p in ("imagenet/", "cache/", "runs/")}
    paths["/tmp/imnet-synth"] = f"{tmp_path}/imnet-synth"
    path, flags = script_argv(make)
    flags = shrink(flags, paths) + ["--num_images", "8", "--num_classes", "2", "--workers", "1"]
    load_script(path).main(flags)
    data = tmp_path / "imnet-synth"
    assert sorted(p.name for p in data.iterdir()) == ["n00000000", "n00000001"]
    path, flags = script_argv(bench)
    args = parse(path, flags)
    assert args.workers == "1,2,4,8" and args.image_sizes == "64,256"
    load_script(path).main(shrink(flags, paths) + [
        "--workers", "0", "--image_sizes", "16", "--batch_size", "2", "--seconds", "0.01",
        "--step_configs", ""])
    path, flags = script_argv(train)
    args = parse(path, flags)
    assert (args.data_index, args.num_workers) == ("cache/index", 8)
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "train").symlink_to(data)
    flags = shrink(flags, paths) + EXTRA + ["--num_workers", "0"]
    run_script(path, flags, monkeypatch)
    (index,) = (tmp_path / "cache" / "index").iterdir()
    assert len(json.loads(index.read_text())["files"]) == 8
    flags[flags.index("--lr_anneal_steps") + 1] = "3"
    run_script(path, flags, monkeypatch)  # resumes: nothing in the folder is checked again
    log = (tmp_path / "runs" / "in64" / "log.txt").read_text()
    assert "data index: 8 images, none changed" in log
    assert (tmp_path / "runs" / "in64" / "model000003.pt").exists()
