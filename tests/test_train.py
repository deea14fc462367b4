"""TrainLoop on a tiny U-Net (CPU): checkpoint files, resume, microbatches, lr annealing."""

import csv
import json
import os
import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion import checkpoints, cli, logger
from guided_diffusion.checkpoints import CheckpointMismatchError
from guided_diffusion.nn import update_ema
from guided_diffusion.resample import LossSecondMomentResampler
from guided_diffusion.script_util import (
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import (
    ClassifierTrainLoop,
    TrainLoop,
    compute_top_k,
    find_resume_checkpoint,
    parse_ema_rates,
    parse_resume_step_from_filename,
    save_atomic,
    save_run_flags,
)

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
TINY = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
    attention_resolutions="8", num_heads=1, diffusion_steps=50,
)


@pytest.fixture(autouse=True)
def _few_threads():
    # Tiny models are dominated by thread overhead; also keeps the 2-core suite responsive.
    n = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(n)
    logger.reset()


def tiny_model_and_diffusion(seed=0, **overrides):
    flags = model_and_diffusion_defaults()
    flags.update(TINY, **overrides)
    th.manual_seed(seed)
    return create_model_and_diffusion(**flags)


def batches(batch_size=2, seed=0, class_cond=False):
    g = th.Generator().manual_seed(seed)
    while True:
        cond = {"y": th.randint(0, 3, (batch_size,), generator=g)} if class_cond else {}
        yield th.randn(batch_size, 3, 16, 16, generator=g), cond


def make_loop(log_dir, steps, resume="", ema_rate="0.9999", save_interval=100, **kw):
    logger.configure(dir=str(log_dir), format_strs=["csv"])
    model, diffusion = tiny_model_and_diffusion()
    defaults = dict(
        model=model, diffusion=diffusion, data=batches(), batch_size=2, microbatch=-1, lr=1e-3,
        ema_rate=ema_rate, log_interval=1, save_interval=save_interval,
        resume_checkpoint=resume, lr_anneal_steps=steps,
    )
    defaults.update(kw)
    return TrainLoop(**defaults)


def load(path):
    return th.load(path, map_location="cpu", weights_only=True)


def test_two_steps_write_the_three_checkpoint_files_as_plain_float32_state_dicts(tmp_path):
    loop = make_loop(tmp_path, steps=2)
    init = {k: v.clone() for k, v in loop.model.state_dict().items()}
    loop.run_loop()
    ckpts = sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt"))
    assert ckpts == ["ema_0.9999_000002.pt", "model000002.pt", "opt000002.pt"]

    model_sd = load(tmp_path / "model000002.pt")
    assert list(model_sd) == list(loop.model.state_dict())  # the original's names and order
    assert all(v.dtype == th.float32 for v in model_sd.values())
    for k, v in loop.model.state_dict().items():
        assert th.equal(model_sd[k], v), k
    assert any(not th.equal(model_sd[k], init[k]) for k in init)  # training changed the weights
    # EMA at 0.9999 after two steps: 0.9999^2 of init + the rest of the (moved) weights.
    ema_sd = load(tmp_path / "ema_0.9999_000002.pt")
    moved = max((ema_sd[k] - init[k]).abs().max().item() for k in init)
    model_moved = max((model_sd[k] - init[k]).abs().max().item() for k in init)
    assert 0 < moved < 0.01 * model_moved

    opt = load(tmp_path / "opt000002.pt")
    assert opt["resume"]["step"] == 2 and opt["resume"]["lg_loss_scale"] == 20.0
    assert opt["resume"]["train_flags"]["lr"] == 1e-3
    assert len(opt["state"]) == len(list(loop.model.parameters()))

    # Logged: step, samples and the linearly annealed lr (step k uses lr * (1 - k / 2)).
    with open(tmp_path / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["step"]) for r in rows] == [1, 2]
    assert [float(r["samples"]) for r in rows] == [2, 4]
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3, 5e-4])
    assert {"loss", "mse", "grad_norm", "param_norm"} <= set(rows[0])


def test_resume_from_model000006_restores_step_model_ema_optimizer_and_loss_scale(tmp_path):
    first = make_loop(tmp_path, steps=6, ema_rate="0.9,0.99", save_interval=3)
    first.mp_trainer.lg_loss_scale = 17.25  # a non-default scale, to see it come back
    first.run_loop()
    assert {"model000003.pt", "model000006.pt", "opt000006.pt", "ema_0.99_000006.pt"} <= set(
        os.listdir(tmp_path)
    )
    saved_opt = first.opt.state_dict()

    # An explicit path and "auto" (the newest model*.pt, not model000003.pt) resume the same.
    for resume in [str(tmp_path / "model000006.pt"), "auto"]:
        loop = make_loop(tmp_path, steps=7, ema_rate="0.9,0.99", resume=resume)
        assert loop.resume_path == str(tmp_path / "model000006.pt")
        assert loop.resume_step == 6 and loop.step == 0
        for p, q in zip(loop.model.parameters(), first.model.parameters()):
            assert th.equal(p, q)
        for ema, ema_first in zip(loop.ema_params, first.ema_params):
            assert all(th.equal(a, b) for a, b in zip(ema, ema_first))
        assert not all(th.equal(a, b) for a, b in zip(loop.ema_params[0], loop.ema_params[1]))
        resumed_opt = loop.opt.state_dict()
        for i, st in saved_opt["state"].items():
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert th.equal(resumed_opt["state"][i][key], st[key]), (i, key)
        assert loop.mp_trainer.lg_loss_scale == 17.25

    loop.run_loop()  # continues at step 6: one more step up to lr_anneal_steps=7
    assert (tmp_path / "model000007.pt").exists()
    with open(tmp_path / "progress.csv") as f:
        steps = [float(r["step"]) for r in csv.DictReader(f) if r["step"]]
    assert steps[-1] == 7
    assert int(loop.opt.state_dict()["state"][0]["step"]) == 7


def test_fused_adam_is_adamw_with_other_rounding_and_each_run_keeps_its_own_kernel(tmp_path):
    """--fused_adam (fast path): the same AdamW update (weights within float32 rounding of the
    original's after 3 steps), and a resume uses the resuming run's kernel, not the
    checkpoint's (a faithful run resumed from a fast run's opt*.pt stays unfused)."""
    loops = {}
    for name, kw in (("plain", {}), ("fused", {"fused_adam": True})):
        loops[name] = make_loop(tmp_path / name, steps=3, save_interval=3, **kw)
        th.manual_seed(1)
        np.random.seed(1)  # the schedule sampler's draws
        loops[name].run_loop()
    plain, fused = loops["plain"], loops["fused"]
    assert fused.opt.param_groups[0]["fused"] is True and plain.opt.param_groups[0]["fused"] is None
    # lr 1e-3: each step moves a weight by up to ~1e-3; the kernels differ by float32 rounding.
    for p, q in zip(plain.model.parameters(), fused.model.parameters()):
        th.testing.assert_close(p, q, rtol=0, atol=1e-4)
    resumed = make_loop(tmp_path / "fused", steps=4, resume="auto")
    assert resumed.resume_step == 3 and resumed.opt.param_groups[0]["fused"] is None


def test_ema_update_is_the_per_tensor_update_bit_for_bit():
    """nn.update_ema batches the tensors (foreach) but computes, for each, exactly the original's
    targ.mul_(rate).add_(src, alpha=1 - rate): the faithful path's EMA weights are unchanged."""
    g = th.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 3, 4, 4), (1,)]
    targ = [th.randn(s, generator=g) for s in shapes]
    src = [th.randn(s, generator=g) for s in shapes]
    expected = [t.clone() for t in targ]
    for t, s_ in zip(expected, src):
        t.mul_(0.9999).add_(s_, alpha=1 - 0.9999)
    update_ema(targ, src, rate=0.9999)
    assert all(th.equal(a, b) for a, b in zip(targ, expected))
    with pytest.raises(ValueError, match="update_ema"):
        update_ema(targ, src[:2], rate=0.9)


def test_auto_resume_in_an_empty_log_dir_starts_fresh(tmp_path):
    loop = make_loop(tmp_path, steps=1, resume="auto")
    assert loop.resume_path == "" and loop.resume_step == 0
    assert find_resume_checkpoint(str(tmp_path)) is None


def test_resume_from_a_released_style_checkpoint_starts_at_step_0(tmp_path):
    src = make_loop(tmp_path / "a", steps=1)
    released = tmp_path / "64x64_diffusion.pt"
    th.save(src.model.state_dict(), released)  # a bare state_dict, no opt/ema beside it
    loop = make_loop(tmp_path / "b", steps=1, resume=str(released))
    assert loop.resume_step == 0
    for p, q in zip(loop.model.parameters(), src.model.parameters()):
        assert th.equal(p, q)
    assert all(th.equal(e, p) for e, p in zip(loop.ema_params[0], loop.model.parameters()))


class _DeterministicDiffusion:
    """A stand-in whose loss has no randomness, so microbatching must not change the gradient."""

    num_timesteps = 4

    def training_losses(self, model, x_start, t, model_kwargs=None):
        out = model(x_start, t, **(model_kwargs or {}))
        return {"loss": ((out - x_start) ** 2).mean(dim=(1, 2, 3))}


class _FixedSampler:
    """t = 0..N-1 (cycled) with weights 1: the same timesteps however the batch is split."""

    def __init__(self):
        self.calls = 0

    def sample(self, batch_size, device):
        t = (th.arange(batch_size) + self.calls) % 4
        self.calls += batch_size
        return t.to(device), th.ones(batch_size, device=device)


def test_microbatches_accumulate_the_full_batch_gradient(tmp_path):
    grads = []
    x = th.randn(4, 3, 16, 16)
    for microbatch in [4, 1, 3]:
        loop = make_loop(
            tmp_path, steps=1, batch_size=4, microbatch=microbatch,
            schedule_sampler=_FixedSampler(),
        )
        loop.diffusion = _DeterministicDiffusion()
        loop.forward_backward(x, {})
        grads.append([p.grad.clone() for p in loop.model.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert th.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_loss_aware_sampler_sees_every_microbatch_loss(tmp_path):
    _, diffusion = tiny_model_and_diffusion()
    sampler = LossSecondMomentResampler(diffusion)
    loop = make_loop(tmp_path, steps=1, microbatch=1, schedule_sampler=sampler)
    loop.run_loop()
    assert sampler._loss_counts.sum() == 2  # batch 2 in microbatches of 1


def test_diffusion_training_test_env_stops_after_first_save(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_TRAINING_TEST", "1")
    logger.configure(dir=str(tmp_path), format_strs=[])
    model, diffusion = tiny_model_and_diffusion(class_cond=True, num_classes=3)
    loop = TrainLoop(
        model=model, diffusion=diffusion, data=batches(class_cond=True), batch_size=2,
        microbatch=-1, lr=1e-4, ema_rate=0.99, log_interval=10, save_interval=2,
        resume_checkpoint="",
    )
    loop.run_loop()  # lr_anneal_steps=0 trains forever; the env var stops it
    assert loop.step == 2
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == [
        "ema_0.99_000002.pt", "model000002.pt", "opt000002.pt"
    ]


def test_save_atomic_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "model000001.pt"
    save_atomic({"a": th.ones(2)}, str(target))
    assert th.equal(load(target)["a"], th.ones(2))
    umask = os.umask(0)
    os.umask(umask)
    # Not mkstemp's private 0600: the mode a plain open() gives, so collaborators can read it.
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(th, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"a": th.zeros(2)}, str(target))
    assert th.equal(load(target)["a"], th.ones(2))  # the old file survives intact
    assert os.listdir(tmp_path) == ["model000001.pt"]  # no temporary left behind


def test_checkpoint_name_parsing_and_newest_lookup(tmp_path):
    assert parse_resume_step_from_filename("/a/b/model012345.pt") == 12345
    assert parse_resume_step_from_filename("/models/256x256_diffusion.pt") == 0
    assert parse_resume_step_from_filename("ema_0.9999_000010.pt") == 0
    for name in ["model000010.pt", "model000200.pt", "model000030.pt", "opt000900.pt", "x.pt"]:
        (tmp_path / name).write_bytes(b"")
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "model000200.pt")
    assert parse_ema_rates("0.9999,0.99") == [0.9999, 0.99]
    assert parse_ema_rates(0.5) == [0.5]
    with pytest.raises(ValueError, match="ema_rate"):
        parse_ema_rates("0.9,abc")


def test_save_run_flags_writes_json_and_reports_changes(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    path = save_run_flags({"lr": 1e-4, "batch_size": 2})
    save_run_flags({"lr": 2e-4, "batch_size": 2})
    assert json.load(open(path)) == {"lr": 2e-4, "batch_size": 2}
    assert "flags changed" in (tmp_path / "log.txt").read_text()
    assert np.isclose(json.load(open(tmp_path / "args.json"))["lr"], 2e-4)


# ------------------------------------------------------------------------------------------------
# Resume goes through the fit check; the run-flags file is written atomically


def test_resume_with_other_model_flags_names_the_flag_not_every_tensor(tmp_path):
    make_loop(tmp_path, steps=1).run_loop()  # trained with --class_cond False
    logger.configure(dir=str(tmp_path), format_strs=[])
    model, diffusion = tiny_model_and_diffusion(class_cond=True, num_classes=3)
    with pytest.raises(CheckpointMismatchError) as err:
        TrainLoop(
            model=model, diffusion=diffusion, data=batches(), batch_size=2, microbatch=-1,
            lr=1e-3, ema_rate="0.9999", log_interval=1, save_interval=1,
            resume_checkpoint="auto",
        )
    message = str(err.value)
    assert "--resume_checkpoint" in message and "model000001.pt" in message
    assert "'label_emb.weight'" in message and "--class_cond False?" in message
    assert len(message.splitlines()) < 8  # not load_state_dict's list of every tensor


def test_resume_checks_the_ema_file_too(tmp_path):
    make_loop(tmp_path, steps=1).run_loop()
    # An EMA file from other flags beside a fitting model file (e.g. copied in by hand).
    other, _ = tiny_model_and_diffusion(learn_sigma=True)
    th.save(other.state_dict(), tmp_path / "ema_0.9999_000001.pt")
    expected = r"(?s)ema_0.9999_000001.pt.*--learn_sigma True\?"
    with pytest.raises(CheckpointMismatchError, match=expected):
        make_loop(tmp_path, steps=2, resume="auto")


def test_save_run_flags_is_atomic(tmp_path, monkeypatch):
    logger.configure(dir=str(tmp_path), format_strs=[])
    path = save_run_flags({"lr": 1e-4})

    def disk_full(fd):
        raise OSError("disk full")

    # The new text is written, then the flush to disk fails: the old file must survive whole.
    monkeypatch.setattr(checkpoints.os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_run_flags({"lr": 2e-4, "batch_size": 8})
    assert json.load(open(path)) == {"lr": 1e-4}
    assert os.listdir(tmp_path) == ["args.json"]  # no temporary left behind


# ------------------------------------------------------------------------------------------------
# The classifier on the one loop

TINY_CLASSIFIER = dict(
    image_size=16, classifier_width=32, classifier_depth=1, classifier_channel_mult="1,2",
    classifier_attention_resolutions="8", diffusion_steps=100,
)


def tiny_classifier(seed=0, **overrides):
    flags = classifier_and_diffusion_defaults()
    flags.update(TINY_CLASSIFIER, **overrides)
    th.manual_seed(seed)
    return create_classifier_and_diffusion(**flags)


def labelled_batches(n_batches, batch_size=4, seed=0):
    g = th.Generator().manual_seed(seed)
    return [
        (th.randn(batch_size, 3, 16, 16, generator=g),
         {"y": th.randint(0, 1000, (batch_size,), generator=g)})
        for _ in range(n_batches)
    ]


def make_classifier_loop(log_dir, data, iterations, resume="", **kw):
    logger.configure(dir=str(log_dir), format_strs=["csv"])
    model, diffusion = tiny_classifier()
    args = dict(
        model=model, diffusion=diffusion, data=iter(data), batch_size=4, microbatch=2, lr=1e-3,
        iterations=iterations, anneal_lr=True, noised=False, log_interval=1, save_interval=100,
        resume_checkpoint=resume,
    )
    args.update(kw)
    return ClassifierTrainLoop(**args)


def test_classifier_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    # noised=False: no random timesteps or noise, so the steps after a resume see exactly what an
    # uninterrupted run sees (the data iterator continues where it stopped, by construction here:
    # load_data's shuffled order is not part of a checkpoint yet).
    data = labelled_batches(4)
    whole = make_classifier_loop(tmp_path / "whole", data, iterations=4)
    whole.run_loop()

    monkeypatch.setenv("DIFFUSION_TRAINING_TEST", "1")  # stop after the first save, at step 2
    first = make_classifier_loop(tmp_path / "split", data, iterations=4, save_interval=2)
    first.run_loop()
    monkeypatch.delenv("DIFFUSION_TRAINING_TEST")
    assert sorted(os.listdir(tmp_path / "split")) == ["model000002.pt", "opt000002.pt",
                                                      "progress.csv"]  # no EMA for a classifier
    second = make_classifier_loop(tmp_path / "split", data[2:], iterations=4, resume="auto")
    assert second.resume_step == 2
    second.run_loop()

    for (name, p), q in zip(whole.model.named_parameters(), second.model.parameters()):
        assert th.equal(p, q), name
    final = load(tmp_path / "split" / "opt000004.pt")
    assert final["resume"]["step"] == 4 and final["resume"]["train_flags"]["iterations"] == 4
    assert th.equal(final["state"][0]["exp_avg"], whole.opt.state_dict()["state"][0]["exp_avg"])
    # The lr annealed over all 4 iterations across the resume: step k uses lr * (1 - k / 4).
    with open(tmp_path / "split" / "progress.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f) if r.get("lr")]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_classifier_logs_accuracy_per_quartile_and_validates_on_schedule(tmp_path):
    seen = []

    class Recorder(th.nn.Module):
        """Logits that put class `label` first for the first half of the batch only."""

        def __init__(self):
            super().__init__()
            self.w = th.nn.Parameter(th.zeros(()))

        def forward(self, x, timesteps):
            seen.append(timesteps.clone())
            logits = th.zeros(x.shape[0], 10) + self.w
            logits[: x.shape[0] // 2, 3] = 1.0  # right on the first half when the label is 3
            return logits

    _, diffusion = tiny_classifier()
    y = th.full((4,), 3)
    data = iter([(th.zeros(4, 3, 16, 16), {"y": y})] * 3)
    val = iter([(th.zeros(4, 3, 16, 16), {"y": y})] * 3)
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    loop = ClassifierTrainLoop(
        model=Recorder(), diffusion=diffusion, data=data, batch_size=4, microbatch=-1, lr=1e-3,
        iterations=3, noised=True, val_data=val, eval_interval=2, log_interval=1,
        save_interval=100, schedule_sampler=_FixedSampler(),
    )
    loop.run_loop()
    # Noised: training sees the sampler's timesteps (0..3 cycled, 100 steps: all in quartile 0).
    assert [t.tolist() for t in seen[:2]] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    with open(tmp_path / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    # Half the batch is classified right; 10 classes, all tied at top-5 except the winner: the
    # label 3 is in the top 5 of every row (ties break towards the lowest index in topk).
    assert [float(r["train_acc@1"]) for r in rows] == [0.5, 0.5, 0.5]
    assert [float(r["train_acc@1_q0"]) for r in rows] == [0.5, 0.5, 0.5]
    assert float(rows[0]["train_loss"]) > 0
    # Validation after step 1 and step 3 (0-based step % eval_interval == 0), as the original.
    assert [bool(r["val_acc@1"]) for r in rows] == [True, False, True]
    assert len(seen) == 3 + 2


def test_top_k_counts_the_label_among_the_k_largest_logits():
    logits = th.tensor([[0.1, 0.5, 0.4], [0.9, 0.02, 0.08]])
    labels = th.tensor([2, 1])
    assert compute_top_k(logits, labels, k=1).tolist() == [0.0, 0.0]
    assert compute_top_k(logits, labels, k=2).tolist() == [1.0, 0.0]
    assert compute_top_k(logits, labels, k=5).tolist() == [1.0, 1.0]  # k > classes: all of them


def run_classifier_train(monkeypatch, *flags: str) -> None:
    """scripts/classifier_train.py as a user runs it, in this process (no interpreter start-up)."""
    path = SCRIPTS / "classifier_train.py"
    spec = importlib.util.spec_from_file_location("classifier_train", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["classifier_train.py", *flags])
    for var in ("OPENAI_LOGDIR", "GD_TRACEBACK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cli.run_main(script.main)


def test_classifier_train_script_auto_resumes_to_the_uninterrupted_weights(
    tmp_path, monkeypatch, capsys
):
    # Real shuffling, random crops and flips, noised inputs at random timesteps, and validation
    # batches: the checkpoint must carry the data positions and every RNG for this to match.
    rng = np.random.default_rng(0)
    for d in ("train", "val"):
        (tmp_path / d).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / d / f"c{i % 3}_{i:03d}.png")
    flags = ["--image_size", "16", "--classifier_width", "32", "--classifier_depth", "1",
             "--classifier_channel_mult", "1,2", "--classifier_attention_resolutions", "8",
             "--num_classes", "10", "--diffusion_steps", "100", "--data_dir",
             str(tmp_path / "train"), "--val_data_dir", str(tmp_path / "val"), "--eval_interval",
             "2", "--batch_size", "2", "--seed", "0", "--save_interval", "2"]
    for out, runs in [("whole", ["5"]), ("split", ["2", "5"])]:
        for iterations in runs:
            run_classifier_train(monkeypatch, *flags, "--iterations", iterations,
                                 "--output_dir", str(tmp_path / out), "--resume_checkpoint", "auto")
        th.manual_seed(123)  # whatever the process did in between does not matter
    assert "loading model from checkpoint" in (tmp_path / "split" / "log.txt").read_text()
    whole, split = (load(tmp_path / out / "model000005.pt") for out in ("whole", "split"))
    start = load(tmp_path / "split" / "model000002.pt")
    assert any(not th.equal(whole[k], start[k]) for k in whole)  # steps 3-5 did train
    for k in whole:
        assert th.equal(whole[k], split[k]), k
    whole_opt, split_opt = (load(tmp_path / out / "opt000005.pt") for out in ("whole", "split"))
    for i, state in whole_opt["state"].items():
        assert all(th.equal(v, split_opt["state"][i][k]) for k, v in state.items()), i
    # 6 images, batch 2: 3 batches per epoch, so 5 steps crossed into a second shuffled epoch.
    ranks = [o["resume"]["ranks"][0] for o in (whole_opt, split_opt)]
    assert ranks[0]["data"] == ranks[1]["data"]
    assert ranks[0]["data"]["train"]["batches_done"] == 5
    assert ranks[0]["data"]["val"]["batches_done"] == 3  # after steps 1, 3 and 5
    assert th.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])

    # Resuming under other model flags: one line naming the flag, no traceback.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_classifier_train(monkeypatch, *flags, "--classifier_use_scale_shift_norm", "False",
                             "--iterations", "6", "--output_dir", str(tmp_path / "split"),
                             "--resume_checkpoint", "auto")
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "--resume_checkpoint" in lines[0] and "model000005.pt" in lines[0]
    assert "--classifier_use_scale_shift_norm True?" in lines[0]
