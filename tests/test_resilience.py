"""Training that survives anything: a run killed at any moment (also inside a checkpoint write) and
restarted with --resume_checkpoint auto ends bit for bit where an uninterrupted run ends, on one
process and on two (an elastic torchrun restart, and two torchrun "nodes" on localhost); a peer
that stops answering makes the others exit within --dist_timeout with a message; non-finite steps
are skipped, counted and finally stop the run; grad clipping and lr warm-up do what they say.

The runs use real shuffling, random flips, diffusion noise, microbatches, two EMA rates and the
LossSecondMomentResampler (2 diffusion steps: its history is full after a few steps, so its
non-uniform weights drive the later steps).
"""

import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch as th
from PIL import Image

from conftest import assert_same_values
from guided_diffusion import logger
from guided_diffusion.image_datasets import ImageDataset, ResumableLoader, _item_seed
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_util import TrainingStopped, TrainLoop

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "image_train.py"
STEPS = 12
FLAGS = [
    "--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
    "--attention_resolutions", "8", "--num_heads", "1", "--diffusion_steps", "2",
    "--noise_schedule", "cosine", "--class_cond", "True", "--batch_size", "4", "--microbatch", "2",
    "--lr", "1e-3", "--ema_rate", "0.9,0.5", "--schedule_sampler", "loss-second-moment",
    "--lr_anneal_steps", str(STEPS), "--save_interval", "3", "--log_interval", "3", "--seed", "3",
    "--resume_checkpoint", "auto",
]
CHECKPOINTS = [f"model{STEPS:06d}.pt", f"ema_0.9_{STEPS:06d}.pt", f"ema_0.5_{STEPS:06d}.pt",
               f"opt{STEPS:06d}.pt"]
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """16 noise images of 20 x 18 px in two classes: crops, flips and order all show."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(8):
            pixels = rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"c{c}_{i:03d}.png")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE",
                "PMI_RANK", "OPENAI_LOGDIR", "GD_FAULT", "GD_FAULT_ONCE", "GD_TRACEBACK",
                "DIFFUSION_TRAINING_TEST"]:
        env.pop(var, None)
    env.update(extra)
    return env


def _train_cmd(data_dir, out_dir) -> list:
    return [str(SCRIPT), *FLAGS, "--data_dir", str(data_dir), "--output_dir", str(out_dir)]


def _run(cmd, expect_rc=0, **env):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == expect_rc, (
        f"{cmd} exited {proc.returncode}, expected {expect_rc}:\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def _torchrun(*args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _load(path):
    return th.load(path, map_location="cpu", weights_only=True)


def _assert_same_final_checkpoints(reference, resumed) -> None:
    for name in CHECKPOINTS:
        # Model, both EMAs, AdamW moments, and the resume entry: step, loss scale, sampler
        # history, every rank's RNG states and data position.
        assert_same_values(_load(reference / name), _load(resumed / name), name)
    ref_model, ref_start = _load(reference / CHECKPOINTS[0]), _load(reference / "model000003.pt")
    assert any(not th.equal(ref_model[k], ref_start[k]) for k in ref_model)  # it did train
    sampler = _load(reference / CHECKPOINTS[-1])["resume"]["schedule_sampler"]
    assert (sampler["loss_counts"] == 10).all()  # warmed up: non-uniform timesteps were drawn


@pytest.fixture(scope="module")
def reference_one(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref1")
    _run([sys.executable, *_train_cmd(data_dir, out)])
    return out


def test_kill_9_anywhere_then_auto_resume_equals_the_uninterrupted_run(
    data_dir, reference_one, tmp_path
):
    out = tmp_path / "cut"
    cmd = [sys.executable, *_train_cmd(data_dir, out)]
    # Killed while writing ema_0.9_000006.pt: step 6's checkpoint is incomplete, resume from 3.
    _run(cmd, expect_rc=-signal.SIGKILL, GD_FAULT="kill@save:6")
    assert any(name.endswith(".tmp") for name in os.listdir(out))  # the write was cut short
    assert not (out / "model000006.pt").exists()
    # Killed between checkpoints, after step 10: resume from 9 (6 was completed this time).
    _run(cmd, expect_rc=-signal.SIGKILL, GD_FAULT="kill@step:10")
    log = (out / "log.txt").read_text()
    assert "loading model from checkpoint" in log and "model000003.pt" in log
    _run(cmd)
    assert not any(name.endswith(".tmp") for name in os.listdir(out))  # leftovers cleaned
    assert "model000009.pt" in (out / "log.txt").read_text()
    _assert_same_final_checkpoints(reference_one, out)


def test_two_ranks_elastic_restart_and_two_node_launch_agree_bit_for_bit(data_dir, tmp_path):
    # Reference: two torchrun agents ("nodes") meeting through the c10d rendezvous on localhost.
    ref = tmp_path / "two_nodes"
    port = _free_port()
    agents = [
        subprocess.Popen(
            _torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                      "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "nodes",
                      *_train_cmd(data_dir, ref)),
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=TIMEOUT_S)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert _load(ref / CHECKPOINTS[-1])["resume"]["train_flags"]["world_size"] == 2

    # One agent, two workers; rank 1 is SIGKILLed after step 5, and rank 0 while it writes the
    # checkpoint of step 9 (after the restart): each time torchrun brings the group down and
    # back, and training resumes from the newest complete checkpoint (3, then 6) by itself.
    out = tmp_path / "elastic"
    proc = _run(
        _torchrun("--standalone", "--nproc_per_node", "2", "--max-restarts", "2",
                  *_train_cmd(data_dir, out)),
        GD_FAULT="kill@step:5/1,kill@save:9/0", GD_FAULT_ONCE=str(tmp_path / "faults"),
    )
    assert sorted(os.listdir(tmp_path / "faults")) == ["kill_save_9_0", "kill_step_5_1"]
    log = (out / "log.txt").read_text()
    assert "model000003.pt..." in log and "model000006.pt..." in log, proc.stderr[-2000:]
    _assert_same_final_checkpoints(ref, out)


def test_a_silent_peer_makes_the_others_exit_within_the_timeout(data_dir, tmp_path):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), GD_FAULT="stop@step:2/1")
        cmd = [sys.executable, *_train_cmd(data_dir, tmp_path / "out"), "--dist_timeout", "5",
               "--log_interval", "1"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    try:
        _, err = procs[0].communicate(timeout=TIMEOUT_S)
        # Rank 1 stopped itself (SIGSTOP) after step 2 and never answers again.
        assert procs[1].poll() is None
        assert procs[0].returncode == 1, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, err[-3000:]
        assert "rank 0 of 2" in lines[0] and "--dist_timeout 5s" in lines[0], lines[0]
        # The heartbeats in the store name the rank that never came to the collective.
        assert "stopped answering: rank 1 (last at step 2, training)" in lines[0], lines[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()


# ------------------------------------------------------------------------------------------------
# In-process: the NaN guard, grad clipping, warm-up, the loader's resumable order

TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="8", num_heads=1, diffusion_steps=4, noise_schedule="cosine")


@pytest.fixture
def one_thread():
    n = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(n)
    logger.reset()


def _batches():
    g = th.Generator().manual_seed(0)
    while True:
        yield th.randn(2, 3, 16, 16, generator=g), {}


class _PoisonedLoop(TrainLoop):
    """The diffusion loss, made NaN at the steps (1-based) in `poisoned`."""

    poisoned: set = set()

    def microbatch_loss(self, micro, micro_cond):
        loss = super().microbatch_loss(micro, micro_cond)
        if self.step + self.resume_step + 1 in self.poisoned:
            loss = loss * float("nan")
        return loss


def _loop(tmp_path, cls=TrainLoop, **kw):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    flags = model_and_diffusion_defaults()
    flags.update(TINY)
    th.manual_seed(0)
    np.random.seed(0)  # the timestep draws
    model, diffusion = create_model_and_diffusion(**flags)
    args = dict(model=model, diffusion=diffusion, data=_batches(), batch_size=2, microbatch=-1,
                lr=1e-3, ema_rate="0.9", log_interval=1, save_interval=2, resume_checkpoint="")
    args.update(kw)
    return cls(**args)


def _snapshot(loop):
    return ([p.detach().clone() for p in loop.model.parameters()],
            [p.clone() for p in loop.ema_params[0]],
            {k: v.clone() for k, v in loop.opt.state_dict()["state"].get(0, {}).items()})


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_nan_guard_skips_counts_and_stops_naming_the_step_and_checkpoint(
    tmp_path, one_thread, precision
):
    _PoisonedLoop.poisoned = {3, 5, 6}
    loop = _loop(tmp_path, cls=_PoisonedLoop, lr_anneal_steps=8, max_bad_steps=3,
                 use_fp16=precision == "fp16", use_bf16=precision == "bf16")
    for _ in range(2):  # two good steps
        loop.run_step(*next(loop.data))
        loop.step += 1
    loop.save()
    before = _snapshot(loop)
    loop.run_step(*next(loop.data))  # step 3: NaN loss
    loop.step += 1
    after = _snapshot(loop)
    for a, b in zip(before, after):  # no optimizer or EMA update
        assert_same_values(a, b, "skipped step")
    assert loop.bad_steps == 1 and loop.bad_in_a_row == 1
    loop.run_step(*next(loop.data))  # step 4 is good again: the run of bad steps resets
    loop.step += 1
    assert loop.bad_in_a_row == 0
    assert any(not th.equal(p, q) for p, q in zip(after[0], loop.model.parameters()))
    _PoisonedLoop.poisoned = {5, 6, 7}
    with pytest.raises(TrainingStopped) as stop:
        loop.run_loop()
    message = str(stop.value)
    assert "3 non-finite steps in a row" in message and "at step 7" in message, message
    # Saved at steps 4 and 6 (a skipped step leaves the weights as they were: still good).
    assert "model000006.pt" in message
    assert loop.bad_steps == 4
    rows = (tmp_path / "progress.csv").read_text().splitlines()
    assert rows[-1].split(",")[rows[0].split(",").index("skipped_steps")] == "3"  # step 6


def test_grad_clip_caps_the_global_norm_and_warmup_ramps_the_lr(tmp_path, one_thread):
    seen = []

    class Spy(TrainLoop):
        def _clip_gradients(self):
            super()._clip_gradients()
            grads = [p.grad for p in self.mp_trainer.master_params if p.grad is not None]
            seen.append((th.linalg.vector_norm(th.stack([g.norm() for g in grads])).item(),
                         self.opt.param_groups[0]["lr"]))

    loop = _loop(tmp_path, cls=Spy, lr_anneal_steps=4, grad_clip=1e-3, lr_warmup_steps=2)
    loop.run_loop()
    # The unclipped norms of this model are far above 1e-3: every step is clipped to it.
    assert [n for n, _ in seen] == pytest.approx([1e-3] * 4, rel=1e-4)
    # Step k (0-based): lr * min(1, (k + 1) / 2) * (1 - k / 4).
    assert [lr for _, lr in seen] == pytest.approx([1e-3 * 0.5, 1e-3 * 0.75, 1e-3 * 0.5,
                                                    1e-3 * 0.25])


def test_loader_resumes_mid_epoch_without_reading_skipped_images(data_dir, monkeypatch):
    paths = sorted(str(p) for p in data_dir.iterdir())
    dataset = ImageDataset(16, paths, random_crop=True, random_flip=True)
    whole = ResumableLoader(dataset, batch_size=3, seed=7, num_workers=0)
    batches = [next(whole)[0] for _ in range(9)]  # 5 batches per epoch: crosses an epoch
    assert not th.equal(batches[0], batches[5])  # a new order and new crops in epoch 1
    state = ResumableLoader(dataset, batch_size=3, seed=7, num_workers=0)
    for _ in range(4):
        next(state)
    reads = []
    read = ImageDataset.__getitem__
    monkeypatch.setattr(ImageDataset, "__getitem__",
                        lambda self, i: reads.append(i) or read(self, i))
    resumed = ResumableLoader(dataset, batch_size=3, seed=99, num_workers=0)
    resumed.load_state_dict(state.state_dict())
    for k in range(4, 9):
        assert th.equal(next(resumed)[0], batches[k]), k
    assert len(reads) == 5 * 3  # only the batches it handed out were read
    # Another batch size: the run goes on (statistically) from the start of the next epoch.
    other = ResumableLoader(dataset, batch_size=4, seed=99, num_workers=0)
    other.load_state_dict(state.state_dict())  # 4 of 5 batches of 3 done: epoch 0 unfinished
    assert other.seed == 7 and other.batches_done == 1 * (len(paths) // 4)
    # Epoch 1's first batch: its seeded permutation, each image with its (seed, epoch, index)
    # augmentation seed.
    epoch1 = np.random.default_rng([7, 1, 0]).permutation(len(paths))[:4]
    want = [th.from_numpy(dataset[(int(i), _item_seed(7, 1, int(i)))][0]) for i in epoch1]
    assert th.equal(next(other)[0], th.stack(want))


def test_sample_grids_and_loss_plot_leave_training_unchanged(tmp_path, one_thread):
    plain = _loop(tmp_path / "plain", lr_anneal_steps=2)
    plain.run_loop()
    watched = _loop(tmp_path / "watched", lr_anneal_steps=2, sample_interval=1)
    watched.run_loop()
    for p, q in zip(plain.model.parameters(), watched.model.parameters()):
        assert th.equal(p, q)  # sampling forked the RNGs: the training draws are the same
    grid = Image.open(tmp_path / "watched" / "samples_000002.png")
    assert grid.size[0] >= 4 * 16 and (tmp_path / "watched" / "samples_000001.png").exists()
    assert Image.open(tmp_path / "watched" / "loss.png").size[0] > 100  # written at the save


def test_training_cost_counts_parameters_and_scales_with_batch_and_microbatch(one_thread):
    from guided_diffusion.costs import training_cost

    flags = model_and_diffusion_defaults()
    flags.update(TINY)
    model, _ = create_model_and_diffusion(**flags)
    with th.device("meta"):
        meta_model, _ = create_model_and_diffusion(**flags)

    def cost(batch, micro):
        inputs = {"x": th.zeros(micro, 3, 16, 16, device="meta"),
                  "timesteps": th.zeros(micro, dtype=th.long, device="meta")}
        return training_cost(meta_model, inputs, batch, micro, n_ema=2)

    small, double, split = cost(2, 2), cost(4, 4), cost(4, 2)
    assert small["params"] == sum(p.numel() for p in model.parameters())
    # AdamW (2 moments), weights, grads and 2 EMAs: 4 bytes each, per parameter.
    assert small["state_bytes"] == small["params"] * 4 * 6
    assert double["flops_per_step"] == 2 * small["flops_per_step"] > 0
    assert split["flops_per_step"] == double["flops_per_step"] and split["passes"] == 2
    # Activations grow with the pass's images (a few saved tensors, e.g. transposed weights of
    # the embedding layers, do not).
    assert 1.8 * split["activation_bytes"] < double["activation_bytes"] < 2 * split[
        "activation_bytes"]
