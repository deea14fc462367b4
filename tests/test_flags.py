"""Every flag of the original's seven scripts exists with the original's default.

The ground truth is `fixtures/golden/script_flags.json`, measured on the original's
`create_argparser()`; users' existing command lines depend on these names and defaults.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = json.loads((ROOT / "tests" / "fixtures" / "golden" / "script_flags.json").read_text())


def load_script(relpath: str):
    """Import a script file (scripts/ is not a package) without running its main()."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_all_seven_scripts_are_covered():
    assert len(FLAGS) == 7
    for relpath in FLAGS:
        assert (ROOT / relpath).exists(), relpath


@pytest.mark.parametrize("relpath", sorted(FLAGS))
def test_every_original_flag_has_its_default(relpath):
    parser = load_script(relpath).create_argparser()
    parsed = vars(parser.parse_args([]))
    for flag, default in FLAGS[relpath].items():
        name = flag[2:]
        assert name in parsed, f"{relpath} lost the original flag {flag}"
        value = parsed[name]
        # Same value and same type: "0.9999" (str) and 0.9999 (float) are different flags.
        assert value == default and type(value) is type(default), (
            f"{relpath} {flag}: default {value!r} ({type(value).__name__}), "
            f"original {default!r} ({type(default).__name__})"
        )


@pytest.mark.parametrize("relpath", sorted(FLAGS))
def test_boolean_flags_parse_like_the_original(relpath):
    """The original's str2bool: `--flag True` / `--flag false` / `--flag 1` all work."""
    parser = load_script(relpath).create_argparser()
    bools = [f for f, d in FLAGS[relpath].items() if isinstance(d, bool)]
    assert bools
    for flag in bools:
        assert getattr(parser.parse_args([flag, "True"]), flag[2:]) is True
        assert getattr(parser.parse_args([flag, "false"]), flag[2:]) is False


# ------------------------------------------------------------------------------------------------
# The one home of the flags (guided_diffusion/config.py)

import dataclasses  # noqa: E402

from guided_diffusion import config, script_util  # noqa: E402

GROUPS = [getattr(config, name) for name in dir(config)
          if dataclasses.is_dataclass(getattr(config, name))]


def test_every_flag_has_a_one_line_help():
    assert len(GROUPS) >= 14
    for group in GROUPS:
        for f in dataclasses.fields(group):
            text = f.metadata.get("help", "")
            assert text and "\n" not in text, f"{group.__name__}.{f.name} has no one-line help"


def test_help_shows_each_flags_comment():
    text = load_script("scripts/image_sample.py").create_argparser().format_help()
    for group in (config.SampleConfig, config.UNetConfig, config.SamplerOptions):
        for f in dataclasses.fields(group):
            assert " ".join(f.metadata["help"].split())[:30] in " ".join(text.split()), f.name


def test_a_flag_is_one_line_in_one_dataclass():
    """A new field reaches the parser, with its type and help, and nothing else is needed."""

    @dataclasses.dataclass(frozen=True)
    class Extra:
        """A group."""

        new_flag: float = config.flag(0.5, "a new knob")
        on: bool = config.flag(False, "a switch")

    parser = config.build_parser("d", Extra, config.CommonConfig)
    args = parser.parse_args(["--new_flag", "2", "--on", "yes"])
    assert args.new_flag == 2.0 and args.on is True and args.seed == -1
    assert "a new knob (default: 0.5)" in parser.format_help()
    assert config.from_flags(Extra, args) == Extra(new_flag=2.0, on=True)
    with pytest.raises(TypeError, match="'other'"):
        config.split_flags(dict(vars(args), other=1), Extra, config.CommonConfig)


def test_shared_names_come_from_the_first_group_and_instances_override_defaults():
    parser = config.build_parser(None, config.SampleConfig(batch_size=4), config.TrainingConfig,
                                 drop=("grid_size",))
    parsed = vars(parser.parse_args([]))
    assert parsed["batch_size"] == 4 and "grid_size" not in parsed and parsed["lr"] == 1e-4


def test_original_views_are_the_dataclasses():
    assert script_util.model_and_diffusion_defaults() == {
        **config.defaults(config.UNetConfig), **config.defaults(config.DiffusionConfig)}
    sr = script_util.sr_model_and_diffusion_defaults()
    assert {"large_size", "small_size"} <= set(sr) and "image_size" not in sr
    # Every super-res flag reaches sr_create_model_and_diffusion (nothing silently ignored).
    model, diffusion = script_util.sr_create_model_and_diffusion(**dict(
        sr, large_size=32, small_size=8, num_channels=32, num_res_blocks=1,
        attention_resolutions="", diffusion_steps=100, timestep_respacing="10",
        learn_sigma=True))
    assert model.out_channels == 6 and model.image_size == 32 and diffusion.num_timesteps == 10


def test_factories_refuse_unknown_flags_by_name():
    with pytest.raises(TypeError, match="num_chanels"):
        script_util.create_model_and_diffusion(num_chanels=32)
    with pytest.raises(TypeError, match="use_fp16"):
        script_util.create_classifier_and_diffusion(use_fp16=True)  # it is classifier_use_fp16


def test_sampler_flag_accepts_exactly_the_samplers():
    from guided_diffusion import config, samplers

    assert set(config.SAMPLER_NAMES) - {""} == set(samplers.SAMPLER_NAMES)
