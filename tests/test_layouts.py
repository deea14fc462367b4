"""The 12 released checkpoints' state_dict layouts, rebuilt from the flags the original README uses.

Built on the meta device, so even the 550M-parameter models cost no memory or init time.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch as th

from guided_diffusion import script_util as su

from conftest import GOLDEN_DIR

LAYOUTS = json.loads((GOLDEN_DIR / "released_checkpoint_layouts.json").read_text())


def _build(kind: str, flags: dict) -> th.nn.Module:
    """Apply the README flags over the matching defaults and call the model factory."""
    defaults, factory = {
        "unet": (su.model_and_diffusion_defaults, su.create_model),
        "classifier": (su.classifier_defaults, su.create_classifier),
        "superres": (su.sr_model_and_diffusion_defaults, su.sr_create_model),
    }[kind]
    args = {**defaults(), **flags}
    params = inspect.signature(factory).parameters
    unknown = set(flags) - set(defaults())
    assert not unknown, f"README flags not among the defaults: {unknown}"
    with th.device("meta"):
        return factory(**{k: v for k, v in args.items() if k in params})


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_released_layout_matches(name):
    spec = LAYOUTS[name]
    model = _build(spec["kind"], spec["flags"])
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == spec["tensors"]  # same names, same shapes, same order
    assert sum(p.numel() for p in model.parameters()) == spec["num_params"]


def test_class_dropout_changes_only_label_emb_rows():
    spec = LAYOUTS["64x64_diffusion.pt"]
    model = _build("unet", {**spec["flags"], "class_dropout_prob": 0.1})
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = dict(map(tuple, spec["tensors"]))
    assert got.keys() == want.keys()
    assert [k for k in got if got[k] != want[k]] == ["label_emb.weight"]
    assert got["label_emb.weight"][0] == want["label_emb.weight"][0] + 1
