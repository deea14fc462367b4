"""Loading checkpoints: round trips, wrapped dicts, mismatch messages that name the flag, refusals."""

from __future__ import annotations

import pytest
import torch as th

from guided_diffusion import script_util as su
from guided_diffusion.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    load_model_checkpoint,
    read_state_dict,
)

from conftest import crc32_init_


def _tiny(**flags):
    args = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                attention_resolutions="8", num_head_channels=16, use_scale_shift_norm=True)
    return su.create_model(**{**args, **flags})


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert th.equal(sa[k], sb[k]), k


def test_round_trip_plain_and_wrapped_state_dicts(tmp_path):
    src = crc32_init_(_tiny(class_cond=True))
    plain, wrapped = tmp_path / "model000010.pt", tmp_path / "ours.pt"
    th.save(src.state_dict(), plain)
    th.save({"model": src.state_dict(), "step": 10, "flags": {"class_cond": True}}, wrapped)
    for path in (plain, str(wrapped)):
        dst = _tiny(class_cond=True)
        load_model_checkpoint(dst, path)
        _assert_same_weights(dst, src)
    dst = _tiny(class_cond=True)
    load_model_checkpoint(dst, {"state_dict": src.state_dict()})
    _assert_same_weights(dst, src)


def test_loading_into_an_fp16_model_keeps_its_dtypes(tmp_path):
    src = crc32_init_(_tiny())
    path = tmp_path / "m.pt"
    th.save(src.state_dict(), path)
    dst = _tiny()
    dst.convert_to_fp16()
    load_model_checkpoint(dst, path)
    assert dst.input_blocks[0][0].weight.dtype == th.float16
    assert th.equal(dst.input_blocks[0][0].weight.float(), src.input_blocks[0][0].weight.half().float())


def test_class_cond_mismatch_names_key_flag_and_file(tmp_path):
    path = tmp_path / "cond.pt"
    th.save(_tiny(class_cond=True).state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_checkpoint(_tiny(class_cond=False), path)
    msg = str(err.value)
    assert "cond.pt" in msg and "'label_emb.weight'" in msg and "--class_cond True" in msg
    assert "checkpoint has 1" in msg  # tensor counts

    path = tmp_path / "uncond.pt"
    th.save(_tiny(class_cond=False).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="--class_cond False") as err:
        load_model_checkpoint(_tiny(class_cond=True), path)
    assert "missing from the checkpoint (1): 'label_emb.weight'" in str(err.value)
    # strict=False tolerates the missing embedding (e.g. fine-tuning a conditional model).
    load_model_checkpoint(_tiny(class_cond=True), path, strict=False)


def test_learn_sigma_mismatch_names_the_output_conv_and_flag():
    sd = _tiny(learn_sigma=True).state_dict()
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_checkpoint(_tiny(learn_sigma=False), sd)
    msg = str(err.value)
    assert "'out.2.weight'" in msg and "[6, 32, 3, 3]" in msg and "--learn_sigma True" in msg
    with pytest.raises(CheckpointMismatchError, match="--learn_sigma False"):
        load_model_checkpoint(_tiny(learn_sigma=True), _tiny(learn_sigma=False).state_dict())


@pytest.mark.parametrize(
    "ckpt_flags, model_flags, expected",
    [
        (dict(class_cond=True, class_dropout_prob=0.1), dict(class_cond=True), "--class_dropout_prob > 0"),
        (dict(use_scale_shift_norm=False), {}, "--use_scale_shift_norm False"),
        (dict(resblock_updown=True), {}, "--resblock_updown True"),
        (dict(num_res_blocks=2), {}, "--num_res_blocks 2"),
        (dict(num_channels=64, num_head_channels=32), {}, "--num_channels"),
        (dict(attention_resolutions="16,8"), {}, "--attention_resolutions"),
    ],
)
def test_mismatch_names_the_likely_flag(ckpt_flags, model_flags, expected):
    with th.device("meta"):
        sd, model = _tiny(**ckpt_flags).state_dict(), _tiny(**model_flags)
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_model_checkpoint(model, sd)


def test_classifier_pool_mismatch_is_named():
    flags = dict(image_size=16, classifier_width=32, classifier_depth=1,
                 classifier_attention_resolutions="8", classifier_channel_mult="1,2",
                 classifier_use_fp16=False, classifier_use_scale_shift_norm=True,
                 classifier_resblock_updown=True)
    with th.device("meta"):
        sd = su.create_classifier(classifier_pool="adaptive", **flags).state_dict()
        model = su.create_classifier(classifier_pool="attention", **flags)
    with pytest.raises(CheckpointMismatchError, match="--classifier_pool adaptive"):
        load_model_checkpoint(model, sd)


class _NotATensor:
    pass


def test_refuses_files_that_need_unpickling(tmp_path):
    path = tmp_path / "evil.pt"
    th.save({"weight": th.zeros(1), "payload": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match="evil.pt.*weights_only=True"):
        read_state_dict(path)


def test_refuses_non_tensor_entries(tmp_path):
    path = tmp_path / "odd.pt"
    th.save({"weight": th.zeros(1), "step": 3}, path)
    with pytest.raises(CheckpointError, match="'step' holds a int"):
        read_state_dict(path)
