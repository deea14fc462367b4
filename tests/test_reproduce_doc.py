"""
docs/reproduce.md says what to run for every paper row: these tests hold it to that.

- Every `python ...` command in its shell blocks names a script that exists and flags that the
  script's own `create_argparser()` accepts (variables such as `$IN256` expanded as a shell would).
- Every checkpoint a command loads is built by that command's flags with exactly the released
  checkpoint's tensor names and shapes (the golden layouts measured on the original).
- The FLOPs table is what FlopCounterMode counts for those layouts, and every "Cost:" line is that
  table times the steps its command runs, converted to GPU-hours by the doc's stated rule.
- One row runs end to end at tiny scale: its sampling command with a tiny random model, then its
  evaluation command (random Inception weights, the samples as their own reference).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest
import torch as th

from conftest import crc32_init_
from guided_diffusion import script_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "reproduce.md")
LAYOUTS = os.path.join(ROOT, "tests", "fixtures", "golden", "released_checkpoint_layouts.json")
# LSUN horse and cat share the bedroom's layout (the original README: "the other two LSUN
# checkpoints should work as well"); the golden file measured the bedroom one.
SAME_LAYOUT = {"lsun_horse.pt": "lsun_bedroom.pt", "lsun_cat.pt": "lsun_bedroom.pt",
               "lsun_horse_nodropout.pt": "lsun_bedroom.pt"}
KIND = {"image_sample.py": "unet", "classifier_sample.py": "unet",
        "super_res_sample.py": "superres"}


# ---------------------------------------------------------------- reading the doc


@lru_cache(maxsize=None)
def _shell_blocks() -> tuple[tuple[int, tuple[str, ...]], ...]:
    """(line number, [argv]) of every `python` command in the doc's ```sh blocks, in order, with
    `NAME="..."` assignments expanded into later commands as a shell session would."""
    env, commands, fence = {}, [], False
    with open(DOC) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line.startswith("```"):
                fence = line.startswith("```sh") and not fence
                continue
            if not fence:
                continue
            m = re.fullmatch(r'([A-Z][A-Z0-9_]*)="(.*)"', line)
            if m:
                env[m.group(1)] = m.group(2)
            elif line.startswith("python "):
                def expand(v, lineno=lineno):
                    assert v.group(1) in env, f"reproduce.md:{lineno}: ${v.group(1)} is not set"
                    return env[v.group(1)]
                argv = shlex.split(re.sub(r"\$([A-Z][A-Z0-9_]*)", expand, line))
                commands.append((lineno, tuple(argv)))
            else:
                assert line.startswith(("curl ", "mkdir ")), f"reproduce.md:{lineno}: {line!r}"
    return tuple(commands)


def shell_blocks() -> list[tuple[int, list[str]]]:
    """A fresh copy of the doc's commands (callers may edit theirs)."""
    return [(lineno, list(argv)) for lineno, argv in _shell_blocks()]


@lru_cache(maxsize=None)
def script_parser(path: str):
    spec = importlib.util.spec_from_file_location(f"doc_{os.path.basename(path)[:-3]}",
                                                  os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined by the script look their module up here
    spec.loader.exec_module(module)
    return module.create_argparser()


def parse_command(lineno: int, argv: list[str]):
    """The command's flags through its script's parser: (script path, namespace)."""
    assert argv[0] == "python", f"reproduce.md:{lineno}: not a python command"
    script = argv[1]
    assert os.path.isfile(os.path.join(ROOT, script)), f"reproduce.md:{lineno}: no {script}"
    try:
        args, unknown = script_parser(script).parse_known_args(argv[2:])
    except SystemExit:  # argparse has printed why (a bad value)
        pytest.fail(f"reproduce.md:{lineno}: {script} rejects {argv[2:]}")
    assert not unknown, f"reproduce.md:{lineno}: {script} has no flags {unknown}"
    return script, args


def test_every_command_parses_with_its_script():
    commands = shell_blocks()
    scripts = {}
    for lineno, argv in commands:
        script, _ = parse_command(lineno, argv)
        scripts[script] = scripts.get(script, 0) + 1
    # Every sampling script and the evaluator are used; 28 rows, each sampled and evaluated.
    assert set(scripts) == {"scripts/image_sample.py", "scripts/classifier_sample.py",
                            "scripts/super_res_sample.py", "evaluations/evaluator.py"}
    assert len(commands) >= 60


# ---------------------------------------------------------------- layouts and FLOPs


def build_on_meta(kind: str, args) -> th.nn.Module:
    defaults = {"unet": script_util.model_and_diffusion_defaults,
                "superres": script_util.sr_model_and_diffusion_defaults,
                "classifier": script_util.classifier_and_diffusion_defaults}[kind]()
    factory = {"unet": script_util.create_model_and_diffusion,
               "superres": script_util.sr_create_model_and_diffusion,
               "classifier": script_util.create_classifier_and_diffusion}[kind]
    with th.device("meta"):  # shapes only: the 512x512 layouts build in a fraction of a second
        model, _ = factory(**script_util.args_to_dict(args, defaults.keys()))
    return model


@lru_cache(maxsize=None)
def loaded_networks() -> dict[str, tuple[str, dict]]:
    """checkpoint file -> (kind, the flags of the first command that loads it)."""
    nets = {}
    for lineno, argv in shell_blocks():
        script, args = parse_command(lineno, argv)
        if script.startswith("evaluations/"):
            continue
        name = os.path.basename(script)
        nets.setdefault(os.path.basename(args.model_path), (KIND[name], args))
        if name == "classifier_sample.py":
            nets.setdefault(os.path.basename(args.classifier_path), ("classifier", args))
    return nets


def test_commands_build_the_released_checkpoints_layouts():
    with open(LAYOUTS) as f:
        golden = json.load(f)
    nets = loaded_networks()
    assert set(golden) <= set(nets), f"no command loads {sorted(set(golden) - set(nets))}"
    for ckpt, (kind, args) in sorted(nets.items()):
        want = golden[SAME_LAYOUT.get(ckpt, ckpt)]
        assert kind == want["kind"], ckpt
        got = [[k, list(v.shape)] for k, v in build_on_meta(kind, args).state_dict().items()]
        assert got == want["tensors"], f"{ckpt}: the doc's flags build a different layout"
    # Every command that loads a checkpoint builds it as the first one does (the sampling grid,
    # --timestep_respacing, is the row's choice).
    for lineno, argv in shell_blocks():
        script, args = parse_command(lineno, argv)
        if not script.startswith("evaluations/"):
            first = nets[os.path.basename(args.model_path)][1]
            defaults = (script_util.sr_model_and_diffusion_defaults() if "super_res" in script
                        else script_util.model_and_diffusion_defaults())
            for k in set(defaults) - {"timestep_respacing"}:
                assert getattr(args, k) == getattr(first, k), f"reproduce.md:{lineno}: --{k}"


def doc_flops_table() -> dict[str, float]:
    table = {}
    with open(DOC) as f:
        for line in f:
            m = re.fullmatch(r"\| (\S+\.pt) \| [^|]+ \| ([0-9.]+) \|\n", line)
            if m:
                table[m.group(1)] = float(m.group(2))
    return table


def test_flops_table_matches_flop_counter():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_check

    table = doc_flops_table()
    nets = loaded_networks()
    assert set(table) == set(nets)
    counted = {}
    for ckpt, (kind, args) in nets.items():
        # Checkpoints with one layout (LSUN x 3; dropout does not change FLOPs) are counted once.
        flags = {k: v for k, v in vars(args).items()
                 if k not in ("model_path", "classifier_path", "output_dir", "dropout")}
        key = (kind, json.dumps(flags, sort_keys=True, default=str))
        if key not in counted:
            counted[key] = gpu_check.network_flops(kind, vars(args)) / 1e9
        assert table[ckpt] == pytest.approx(counted[key], abs=0.051), ckpt
    assert len(counted) < len(nets)
    # The classifier gradient (forward + backward to the input) costs about two forwards.
    assert 1.8 < table["256x256_classifier.pt"] / 146.7 < 2.2


def steps_of(args) -> int:
    """Network evaluations per sample of a sampling command (multistep solvers: one per step)."""
    if args.sampler:
        assert args.sampler == "dpm++2m" and args.steps > 0
        return args.steps
    spec = args.timestep_respacing
    if spec.startswith("ddim"):
        return int(spec[4:])
    return sum(int(s) for s in spec.split(","))


def test_cost_lines_follow_the_stated_rule():
    text = open(DOC).read()
    m = re.search(r"R = ([0-9]+) TFLOP/s", text)
    rate = float(m.group(1))
    table = doc_flops_table()
    blocks = re.findall(r"```sh\n(.*?)```\n\nCost: (.*?)\.\n", text, flags=re.S)
    assert len(blocks) >= 40
    env = dict(re.findall(r'^([A-Z][A-Z0-9_]*)="(.*)"$', text, flags=re.M))
    for block, cost in blocks:
        cost = " ".join(cost.split())
        terms = re.findall(r"(\d+) × ([0-9.]+) \((\S+\.pt)\)", cost)
        total = re.search(r"\*\*([0-9.]+) TFLOP/sample\*\*, \*\*([0-9.,]+) GPU-hours\*\*", cost)
        assert terms and total, cost
        for _, gflop, ckpt in terms:
            assert float(gflop) == table[ckpt], cost
        tflop = sum(int(s) * table[c] for s, _, c in terms) / 1e3
        assert float(total.group(1)) == pytest.approx(tflop, abs=0.051), cost
        hours = 50000 * tflop / rate / 3600
        assert float(total.group(2).replace(",", "")) == pytest.approx(hours, abs=0.051), cost
        # Each term's step count is what the command loading that network runs.
        for line in block.splitlines():
            if not line.startswith("python scripts/"):
                continue
            argv = shlex.split(re.sub(r"\$(\w+)", lambda v: env[v.group(1)], line))
            _, args = parse_command(0, argv)
            loads = {os.path.basename(args.model_path),
                     os.path.basename(getattr(args, "classifier_path", "") or "-")}
            for s, _, ckpt in terms:
                if ckpt in loads:
                    assert int(s) == steps_of(args), f"{ckpt}: {s} steps vs {line}"


# ---------------------------------------------------------------- one row, end to end


def set_flag(argv: list[str], name: str, value: str) -> None:
    i = argv.index(f"--{name}") if f"--{name}" in argv else None
    if i is None:
        argv += [f"--{name}", value]
    else:
        argv[i + 1] = value


def run(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("OPENAI_LOGDIR", None)
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_imagenet64_row_runs_end_to_end_at_tiny_scale(tmp_path):
    commands = shell_blocks()
    sample = next(a for _, a in commands
                  if "runs/in64_adm" in a and a[1].endswith("image_sample.py"))
    evaluate = next(a for _, a in commands if a[1].endswith("evaluator.py") and
                    a[3].startswith("runs/in64_adm/"))
    # The row's own flags, with the model shrunk: 32 px, 32 channels, 4 samples, 2 steps, fp32.
    tiny = dict(image_size="32", num_channels="32", num_res_blocks="1", num_head_channels="16",
                use_fp16="False", num_samples="4", batch_size="4", timestep_respacing="2",
                output_dir=str(tmp_path), model_path=str(tmp_path / "model.pt"), seed="0",
                progress="False")
    for k, v in tiny.items():
        set_flag(sample, k, v)
    _, args = parse_command(0, sample)
    assert args.class_cond and args.noise_schedule == "cosine"  # still the 64x64 row's model
    model = build_on_meta("unet", args).to_empty(device="cpu")
    th.save(crc32_init_(model).state_dict(), tmp_path / "model.pt")
    run(sample)
    out = tmp_path / "samples_4x32x32x3.npz"
    with np.load(out, allow_pickle=False) as z:
        assert z["arr_0"].shape == (4, 32, 32, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].shape == (4,)  # class-conditional: labels saved

    # Evaluation: the row's command with the samples as their own reference (equal statistics:
    # FID and sFID are exactly 0, precision and recall 1) and random Inception weights.
    from evaluations.inception import FIDInceptionV3

    th.save(FIDInceptionV3().state_dict(), tmp_path / "inception.pth")
    evaluate[2], evaluate[3] = str(out), str(out)
    for k, v in dict(output=str(tmp_path / "metrics.json"), device="cpu", batch_size="4",
                     inception_path=str(tmp_path / "inception.pth")).items():
        set_flag(evaluate, k, v)
    assert evaluate[evaluate.index("--preprocessing") + 1] == "tf"
    run(evaluate)
    with open(tmp_path / "metrics.json") as f:
        metrics = json.load(f)
    assert 0 <= metrics["fid"] < 1e-3 and 0 <= metrics["sfid"] < 1e-3
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert metrics["inception_score"] >= 1.0
