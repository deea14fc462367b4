"""The diffusers bridge: exported models compute in diffusers what they compute here.

- Forward parity (fp32, crc32 weights, 1e-5) through a folder `export_to_diffusers` wrote and
  diffusers' own `from_pretrained`: ADM-64-like (new attention order, class-conditional, learned
  sigma, BigGAN up/down), ADM-256-like (legacy attention order with several heads, scale-shift),
  an unconditional LSUN-like layout, a plain layout (conv resampling, additive timestep), DiT-S/2.
- diffusers' DDPMScheduler / DDIMScheduler loops on the exported model give our p_sample_loop /
  ddim_sample_loop samples from the same noise.
- import(export(m)) gives m's tensors exactly (torch.equal), for every layout above.
- Every released U-Net layout converts name for name on the meta device, or is refused naming the
  flag that diffusers' UNet2DModel cannot express; DiT-XL/2 at 256 and 512 likewise.
- The two scripts and the README's commands run end to end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import runpy
import sys

import pytest
import torch as th

diffusers = pytest.importorskip("diffusers")

from guided_diffusion import cli  # noqa: E402
from guided_diffusion import diffusers_bridge as br  # noqa: E402
from guided_diffusion import script_util as su  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    create_dit_and_diffusion,
    dit_and_diffusion_defaults,
)
from guided_diffusion.dit import DiT_models, get_2d_sincos_pos_embed  # noqa: E402

from conftest import GOLDEN_DIR, crc32_init_  # noqa: E402
from test_layouts import _build as build_released  # noqa: E402  (the README flags -> model)

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYOUTS = json.loads((GOLDEN_DIR / "released_checkpoint_layouts.json").read_text())

SMALL = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
             attention_resolutions="16,8", num_head_channels=16)
UNET_CASES = {
    # ADM-64: new attention order, class-conditional, learned sigma, BigGAN up/down, AdaGN.
    "adm64": dict(SMALL, class_cond=True, num_classes=10, learn_sigma=True, dropout=0.1,
                  use_new_attention_order=True, resblock_updown=True, use_scale_shift_norm=True,
                  noise_schedule="cosine"),
    # ADM-256: the legacy order with 2 heads per block (the q/k/v rows must be regrouped).
    "adm256": dict(SMALL, class_cond=True, num_classes=10, learn_sigma=True,
                   use_new_attention_order=False, resblock_updown=True,
                   use_scale_shift_norm=True),
    # LSUN: unconditional, dropout 0.1.
    "lsun": dict(SMALL, learn_sigma=True, dropout=0.1, resblock_updown=True,
                 use_scale_shift_norm=True),
    # improved-diffusion style: conv resampling, additive timestep, one head, fixed sigma.
    "plain": dict(SMALL, num_heads=1, num_head_channels=-1, use_scale_shift_norm=False,
                  resblock_updown=False, attention_resolutions="32,8"),
}
# The sampler loops run a 16 px ADM-64-like model (two levels) for speed.
LOOP = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="8", num_head_channels=16, class_cond=True, num_classes=10,
            learn_sigma=True, use_new_attention_order=True, resblock_updown=True,
            use_scale_shift_norm=True, noise_schedule="cosine")
# DiT-S/2's widths (384, 6 heads, patch 2) at depth 2, on 4-channel 8x8 "latents".
DIT_FLAGS = dict(image_size=8, class_cond=True, num_classes=10, learn_sigma=True,
                 class_dropout_prob=0.1, dit_model="DiT-S/2", dit_depth=2)


# Tiny models run fastest on one thread of a busy CPU (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(name: str, **diffusion):
    flags = {**(LOOP if name == "loop" else UNET_CASES[name]), **diffusion}
    model, diffusion = su.create_model_and_diffusion(**flags)
    return crc32_init_(model), diffusion, flags


def _dit(**overrides):
    flags = {**DIT_FLAGS, **overrides}
    model, diffusion = create_dit_and_diffusion(in_channels=4, **flags)
    crc32_init_(model)
    # pos_embed is DiT's fixed table (diffusers recomputes it rather than loading it).
    with th.no_grad():
        model.pos_embed.copy_(get_2d_sincos_pos_embed(model.hidden_size,
                                                      model.x_embedder.grid_size)[None])
    return model, diffusion, dict(flags, model="dit")


def _export(model, flags, tmp_path, name="exported") -> str:
    return br.export_to_diffusers(model, flags, str(tmp_path / name))


def _load_unet(folder: str):
    return diffusers.UNet2DModel.from_pretrained(folder, subfolder="unet").eval()


def _inputs(model, n=3, size=None, channels=3):
    g = th.Generator().manual_seed(0)
    size = size or model.image_size
    x = th.randn(n, channels, size, size, generator=g)
    t = th.tensor([0, 417, 999])[:n]
    return x, t


@pytest.mark.parametrize("name", sorted(UNET_CASES))
def test_exported_unet_matches_forward(name, tmp_path):
    model, _, flags = _unet(name)
    theirs = _load_unet(_export(model, flags, tmp_path))
    x, t = _inputs(model)
    y = th.tensor([1, 5, 9]) if model.num_classes is not None else None
    with th.no_grad():
        ours = model(x, t, y=y) if y is not None else model(x, t)
        out = theirs(x, t, class_labels=y).sample
    assert out.shape == ours.shape
    th.testing.assert_close(out, ours, rtol=0, atol=1e-5)


def test_exported_dit_matches_forward(tmp_path):
    model, _, flags = _dit()
    folder = _export(model, flags, tmp_path)
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    theirs.eval()
    x, t = _inputs(model, size=8, channels=4)
    y = th.tensor([1, 5, 10])  # 10: the null label
    with th.no_grad():
        ours = model(x, t, y=y)
        raw = theirs(x, timestep=t, class_labels=y).sample
        exact = br.match_dit_timestep_features(theirs)(x, timestep=t, class_labels=y).sample
    th.testing.assert_close(exact, ours, rtol=0, atol=1e-5)
    # Out of the box diffusers' DiT divides its timestep frequencies by 127, not 128: visibly off.
    assert (raw - ours).abs().max() > 1e-4


def _same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and th.equal(a[k], b[k]), k


def _import(folder: str):
    """What scripts/from_diffusers.py does, in process: the folder's flags -> model -> tensors."""
    back = br.read_diffusers_folder(folder)
    if back.kind == "dit":
        names, factory = dit_and_diffusion_defaults(), create_dit_and_diffusion
    else:
        names, factory = su.model_and_diffusion_defaults(), su.create_model_and_diffusion
    model, _ = factory(in_channels=back.in_channels,
                       **{k: v for k, v in back.flags.items() if k in names})
    br.check_config(model, back.config, folder)
    model.load_state_dict(br.from_diffusers_state_dict(model, back.state_dict), strict=True)
    return model


@pytest.mark.parametrize("name", sorted(UNET_CASES) + ["dit", "dit_no_label_dropout"])
def test_import_of_export_is_exact(name, tmp_path):
    if name.startswith("dit"):
        model, _, flags = _dit(class_dropout_prob=0.0 if "no_label" in name else 0.1)
    else:
        model, _, flags = _unet(name)
    back = _import(_export(model, flags, tmp_path))
    _same_tensors(back.state_dict(), model.state_dict())
    # The legacy order comes back as legacy: the flags file carries what the configs cannot.
    if not name.startswith("dit"):
        assert back.middle_block[1].attention.__class__ is model.middle_block[1].attention.__class__


def _noise_fn(seed: int):
    g = th.Generator().manual_seed(seed)
    return g, lambda x: th.randn(x.shape, generator=g, dtype=x.dtype)


def test_ddpm_scheduler_loop_gives_our_ddpm_samples(tmp_path):
    model, diffusion, flags = _unet("loop", diffusion_steps=25)
    folder = _export(model, flags, tmp_path)
    unet = _load_unet(folder)
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    shape = (2, 3, 16, 16)
    x_t = th.randn(shape, generator=th.Generator().manual_seed(1))
    y = th.tensor([3, 7])
    _, noise_fn = _noise_fn(2)
    with th.no_grad():
        ours = diffusion.p_sample_loop(model, shape, noise=x_t.clone(), model_kwargs={"y": y},
                                       noise_fn=noise_fn)
        g, _ = _noise_fn(2)  # the same stream of per-step noise, drawn by diffusers
        x = x_t.clone()
        scheduler.set_timesteps(25)
        assert scheduler.timesteps.tolist() == list(range(24, -1, -1))
        for t in scheduler.timesteps:
            # learned sigma: DDPMScheduler splits eps and the variance interpolation itself.
            x = scheduler.step(unet(x, t, class_labels=y).sample, t, x, generator=g).prev_sample
    th.testing.assert_close(x, ours, rtol=0, atol=1e-4)


def test_ddim_scheduler_loop_gives_our_ddim_samples(tmp_path):
    model, _, flags = _unet("loop", diffusion_steps=50)
    folder = _export(model, flags, tmp_path)
    _, diffusion = su.create_model_and_diffusion(**{**flags, "timestep_respacing": "ddim10"})
    unet = _load_unet(folder)
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    shape = (2, 3, 16, 16)
    x_t = th.randn(shape, generator=th.Generator().manual_seed(1))
    y = th.tensor([3, 7])
    with th.no_grad():
        ours = diffusion.ddim_sample_loop(model, shape, noise=x_t.clone(), model_kwargs={"y": y})
        x = x_t.clone()
        scheduler.set_timesteps(10)  # "leading": 45, 40, ..., 0 = our "ddim10" grid
        for t in scheduler.timesteps:
            eps = unet(x, t, class_labels=y).sample[:, :3]  # drop the variance channels
            # Our DDIM re-derives eps from the clipped x_0, as use_clipped_model_output does.
            x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    th.testing.assert_close(x, ours, rtol=0, atol=1e-4)


def test_scheduler_config_matches_the_diffusion():
    _, diffusion = su.create_model_and_diffusion(
        **{**UNET_CASES["adm64"], "diffusion_steps": 100})
    cfg = br.scheduler_config({"learn_sigma": True, "noise_schedule": "cosine",
                               "diffusion_steps": 100})
    # The betas it trains with (the spaced diffusion recomputes them: equal to ~1e-16).
    th.testing.assert_close(th.tensor(cfg["trained_betas"], dtype=th.float64),
                            th.from_numpy(diffusion.betas), rtol=1e-12, atol=0)
    assert cfg["num_train_timesteps"] == 100
    assert (cfg["variance_type"], cfg["prediction_type"], cfg["clip_sample"]) == (
        "learned_range", "epsilon", True)
    cfg = br.scheduler_config({"predict_xstart": True})
    assert (cfg["variance_type"], cfg["prediction_type"]) == ("fixed_large", "sample")
    assert br.diffusion_flags_from_scheduler(cfg) == dict(
        diffusion_steps=1000, noise_schedule="linear", learn_sigma=False, predict_xstart=True)
    # diffusers' own cosine ("squaredcos_cap_v2") is the same schedule as ours.
    assert br.diffusion_flags_from_scheduler(
        {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
         "variance_type": "learned_range"})["noise_schedule"] == "cosine"
    with pytest.raises(br.BridgeError, match="variance_type"):
        br.diffusion_flags_from_scheduler({**cfg, "variance_type": "fixed_small"})
    with pytest.raises(br.BridgeError, match="beta"):
        br.diffusion_flags_from_scheduler({"beta_schedule": "scaled_linear"})
    # A consistency model's scheduler has default-looking betas: refused, not read as linear.
    with pytest.raises(br.BridgeError, match="_class_name"):
        br.diffusion_flags_from_scheduler({"_class_name": "CMStochasticIterativeScheduler"})
    with pytest.raises(br.BridgeError, match="--rescale_timesteps"):
        br.scheduler_config({"rescale_timesteps": True, "diffusion_steps": 100})


# ------------------------------------------------------------------------------------------------
# Released layouts, on the meta device


def _meta_state(model: th.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _build_released(spec):
    return build_released(spec["kind"], spec["flags"])


REFUSED = {  # layout -> the flag the refusal names
    "128x128_diffusion.pt": "--num_heads",
    "64_256_upsampler.pt": "--num_heads",
    "512x512_diffusion.pt": "--channel_mult",
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_released_layout_converts_name_for_name(name):
    spec = LAYOUTS[name]
    model = _build_released(spec)
    assert [[k, s] for k, s in _meta_state(model).items()] == spec["tensors"]
    if spec["kind"] == "classifier":
        with pytest.raises(br.BridgeError, match="no diffusers counterpart"):
            br.diffusers_config(model)
        return
    if name in REFUSED:
        with pytest.raises(br.BridgeError, match=REFUSED[name]):
            br.diffusers_config(model)
        return
    config = br.diffusers_config(model)
    with th.device("meta"):
        theirs = diffusers.UNet2DModel(**config)
    converted = br.to_diffusers_state_dict(model)
    assert {k: list(v.shape) for k, v in converted.items()} == _meta_state(theirs)
    back = br.from_diffusers_state_dict(model, theirs.state_dict())
    assert {k: list(v.shape) for k, v in back.items()} == _meta_state(model)


@pytest.mark.parametrize("input_size", [32, 64])  # DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt
def test_released_dit_layout_converts_name_for_name(input_size):
    with th.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=input_size)
        theirs = diffusers.DiTTransformer2DModel(**br.diffusers_config(model))
    # DiT-XL/2's 675,129,632 parameters at 256 px; only pos_embed grows with the latent.
    tokens = (input_size // 2) ** 2
    assert sum(p.numel() for p in model.parameters()) == 675_129_632 + (tokens - 256) * 1152
    converted = br.to_diffusers_state_dict(model)
    assert {k: list(v.shape) for k, v in converted.items()} == _meta_state(theirs)
    back = br.from_diffusers_state_dict(model, theirs.state_dict())
    assert {k: list(v.shape) for k, v in back.items()} == _meta_state(model)


# ------------------------------------------------------------------------------------------------
# Refusals: one line naming the thing


def test_refusals_name_the_problem(tmp_path, monkeypatch):
    model, _, flags = _unet("plain")
    folder = _export(model, flags, tmp_path)
    with pytest.raises(br.BridgeError, match="exists"):
        _export(model, flags, tmp_path)
    # An edited config no longer describes the flags' model.
    cfg_path = os.path.join(folder, "unet", "config.json")
    cfg = json.loads(open(cfg_path).read())
    json.dump({**cfg, "layers_per_block": 2}, open(cfg_path, "w"))
    back = br.read_diffusers_folder(folder)
    built, _ = su.create_model_and_diffusion(**{k: v for k, v in back.flags.items()
                                                if k in su.model_and_diffusion_defaults()})
    with pytest.raises(br.BridgeError, match="layers_per_block"):
        br.check_config(built, back.config, folder)
    # Only safetensors are read: a pickled .bin is refused, never loaded.
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    os.replace(weights, weights[: -len(".safetensors")] + ".bin")
    with pytest.raises(br.BridgeError, match="pickle"):
        br.read_diffusers_folder(folder)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(br.BridgeError, match=r"pip install -e \.\[diffusers\]"):
        br.require_diffusers()


# ------------------------------------------------------------------------------------------------
# Scripts and README


def _run_script(command: str) -> None:
    """Run `python scripts/X.py ...` as its command line does: argv, `__main__`, exit status."""
    words = command.split()
    argv = [str(ROOT / words[1]), *words[2:]]
    old = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        assert not e.code, f"{command} exited with {e.code}"
    finally:
        sys.argv = old


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Moving models to and from diffusers")
    end = text.find("\n## ", start + 3)
    return text[start:end]


def test_readme_diffusers_commands_run(tmp_path, monkeypatch, capsys):
    """The README section's commands, verbatim, on a random-weight model of their flags."""
    section = _readme_section()
    commands = [ln.strip() for ln in section.splitlines()
                if ln.strip().startswith("python scripts/")]
    assert [c.split()[1] for c in commands] == ["scripts/to_diffusers.py",
                                                "scripts/from_diffusers.py",
                                                "scripts/to_diffusers.py",
                                                "scripts/from_diffusers.py"]
    script = ROOT / "scripts" / "to_diffusers.py"
    spec = importlib.util.spec_from_file_location("to_diffusers", script)
    to_diffusers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(to_diffusers)  # for its parser
    for command in commands[::2]:  # each export's --model_path: a checkpoint of its flags
        args = to_diffusers.create_argparser().parse_args(command.split()[2:])
        model, _ = cli.build_model_and_diffusion(args)
        crc32_init_(model)
        if args.model == "dit":  # DiT's fixed position table, as training keeps it
            with th.no_grad():
                model.pos_embed.copy_(get_2d_sincos_pos_embed(
                    model.hidden_size, model.x_embedder.grid_size)[None])
        path = tmp_path / args.model_path
        path.parent.mkdir(parents=True, exist_ok=True)
        th.save(model.state_dict(), path)
    monkeypatch.chdir(tmp_path)
    for command in commands:  # in process (a fresh interpreter per command costs 15 s here)
        _run_script(command)
    for command in commands[::2]:
        args = to_diffusers.create_argparser().parse_args(command.split()[2:])
        back_cmd = commands[commands.index(command) + 1].split()
        back = th.load(tmp_path / back_cmd[back_cmd.index("--output") + 1], weights_only=True)
        _same_tensors(back, th.load(tmp_path / args.model_path, weights_only=True))
        # args.json rebuilds it: the model flags as given on the export's command line.
        saved = json.loads((tmp_path / back_cmd[back_cmd.index("--output") + 1]).parent.joinpath(
            "args.json").read_text())
        for key in ("image_size", "num_channels", "channel_mult", "class_dropout_prob",
                    "predict_xstart", "noise_schedule", "learn_sigma", "dit_model"):
            if key in saved:
                assert saved[key] == getattr(args, key), key
        spec = cli.MODEL_KINDS[saved.get("model", "unet")]
        rebuilt, _ = spec.factory(**{k: saved[k] for k in spec.defaults()})
        rebuilt.load_state_dict(back, strict=True)
    # The Python snippet of the section runs on the exported folder.
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {})
    assert "torch.Size([8, 3, 16, 16])" in capsys.readouterr().out


def test_scripts_refuse_with_one_line(tmp_path, monkeypatch, capsys):
    """A layout UNet2DModel cannot express: one line naming the flag, exit 1, nothing written."""
    flags = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                 attention_resolutions="32,8", num_heads=2)  # heads of 16 and 32 channels
    model, _ = su.create_model_and_diffusion(**flags)
    th.save(model.state_dict(), tmp_path / "m.pt")
    argv = [str(ROOT / "scripts" / "to_diffusers.py"), "--model_path", str(tmp_path / "m.pt"),
            "--output_dir", str(tmp_path / "out")]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(argv[0], run_name="__main__")
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --num_heads 2") and \
        "--num_head_channels" in lines[0], lines
    assert os.listdir(tmp_path) == ["m.pt"]  # no folder, no temporary left behind


def test_unconditional_export_is_a_ddpm_pipeline(tmp_path):
    model, _, flags = _unet("lsun", diffusion_steps=50)
    folder = _export(model, flags, tmp_path)
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    image = pipe(batch_size=1, num_inference_steps=2, output_type="np",
                 generator=th.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and ((0 <= image) & (image <= 1)).all()
    # A class-conditional export has no pipeline file: DDPMPipeline would drop the labels.
    model, _, flags = _unet("adm64")
    assert not os.path.exists(os.path.join(_export(model, flags, tmp_path, "cond"),
                                           "model_index.json"))


@pytest.mark.parametrize("argv, message", [
    (["from_diffusers.py", "no/such/folder", "--output", "out/m.pt"],
     "error: 'no/such/folder': no such folder"),
    (["from_diffusers.py", "some/folder"], "error: --output is required"),
    (["to_diffusers.py", "--output_dir", "out"], "error: --model_path is required"),
])
def test_script_bad_input_is_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / argv[0]), *argv[1:]])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(sys.argv[0], run_name="__main__")
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert os.listdir(tmp_path) == []  # nothing written
