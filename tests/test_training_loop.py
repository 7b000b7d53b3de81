"""The shared training loop (mitosis_ldm/training.py) beyond the spine's round trip: checkpoint rotation, resume at
the edges (a finished run, a killed save, a missing folder, both flags), gradient accumulation, EMA state, logging
cadence and the seed."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from mitosis_ldm.config import load_config
from mitosis_ldm.errors import UserError
from mitosis_ldm.training import TrainConfig, TrainingRun


@dataclass
class LoopConfig:
    out: str = "runs/x"
    train: TrainConfig = field(default_factory=TrainConfig)
    note: str | None = None


class Jittered(torch.utils.data.Dataset):
    """Rows with random offsets drawn as each is read, as an augmentation draws: from torch, NumPy and Python."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i] + 0.01 * torch.rand(3) + 0.001 * np.random.rand() + 0.001 * random.random()


def train(run_dir, max_steps, resume=None, overwrite=False, ema=False, draws=False, own_generator=False,
          **train_keys):
    """A linear model trained the way every stage's loop is written; (start step, end step, run, weights, batch sums
    in the order seen, the EMA weights or None). `draws`: the data and each step draw random numbers too, as the
    stages' augmentations and diffusion noise do."""
    from diffusers.training_utils import EMAModel

    keys = dict(batch_size=4, checkpoint_every=4, keep_checkpoints=2, log_every=1)
    tcfg = TrainConfig(max_steps=max_steps, **{**keys, **train_keys})
    run = TrainingRun(run_dir, tcfg, LoopConfig(train=tcfg), resume=resume, overwrite=overwrite)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    average = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, power=2 / 3) if ema else None
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rows = torch.arange(96.0).reshape(32, 3) / 96
    loader = torch.utils.data.DataLoader(Jittered(rows) if draws else rows, batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(1) if own_generator else None)
    model, opt, loader = run.accelerator.prepare(model, opt, loader)
    run.register(average)
    step = start = run.resume()
    batches = []
    for x in run.batches(loader, step):
        with run.accelerator.accumulate(model):
            loss = (model(x + torch.randn_like(x) if draws else x) - 1).pow(2).mean()
            run.accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        batches.append(x.sum().item())
        if run.accelerator.sync_gradients:
            if average is not None:
                average.step(model.parameters())
            step += 1
            run.step_done(step, {"loss": loss.item()})
            if step >= max_steps:
                break
    run.finish()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    ema_weights = torch.cat([p.flatten() for p in average.shadow_params]) if ema else None
    return start, step, run, weights, batches, ema_weights


def logged_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_only_the_last_keep_checkpoints_are_kept_and_0_keeps_the_latest(tmp_path):
    _, _, run, *_ = train(tmp_path / "two", 10, checkpoint_every=2, keep_checkpoints=2)
    assert [s for s, _ in run.checkpoints()] == [8, 10]
    _, _, run, *_ = train(tmp_path / "zero", 10, checkpoint_every=2, keep_checkpoints=0)
    assert [s for s, _ in run.checkpoints()] == [10]  # resume needs one
    _, _, run, *_ = train(tmp_path / "none", 10, checkpoint_every=0)
    assert run.checkpoints() == [] and list((tmp_path / "none" / "checkpoints").iterdir()) == []


def test_resuming_a_finished_run_trains_no_further_step(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, 8)
    lines = logged_steps(run_dir)
    start, end, *_ = train(run_dir, 8, resume="latest")
    assert (start, end) == (8, 8) and logged_steps(run_dir) == lines


def test_a_save_killed_half_way_does_not_stop_the_next_save_of_that_step(tmp_path):
    # a kill during save_state leaves .checkpoint-N.tmp; the resumed run reaches step N again and must save it
    run_dir = tmp_path / "run"
    train(run_dir, 4)
    stale = run_dir / "checkpoints" / ".checkpoint-8.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    start, end, run, *_ = train(run_dir, 8, resume="latest")
    assert (start, end) == (4, 8) and [s for s, _ in run.checkpoints()] == [4, 8]
    assert not stale.exists() and (run_dir / "checkpoints" / "checkpoint-8" / "model.safetensors").stat().st_size > 100


def test_resume_of_a_run_folder_that_does_not_exist_is_refused(tmp_path):
    # a mistyped --out with --resume latest would otherwise start a new run from step 0 without a word
    with pytest.raises(UserError, match="typo: --resume latest given but the run folder does not exist"):
        TrainingRun(tmp_path / "typo", TrainConfig(), resume="latest")
    assert not (tmp_path / "typo").exists()


def test_resume_with_overwrite_keeps_the_checkpoints_and_continues(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, 4)
    start, end, run, *_ = train(run_dir, 8, resume="latest", overwrite=True)
    assert (start, end) == (4, 8) and [s for s, _ in run.checkpoints()] == [4, 8]
    assert logged_steps(run_dir) == list(range(1, 9))


def test_an_optimizer_step_takes_grad_accum_batches_and_resume_keeps_the_shuffle(tmp_path):
    # 8 batches an epoch, 2 a step: 4 steps an epoch; the resumed run starts the second epoch's shuffle
    _, _, _, straight, straight_batches, _ = train(tmp_path / "straight", 8, grad_accum=2)
    assert len(straight_batches) == 16
    train(tmp_path / "stopped", 4, grad_accum=2)
    start, _, _, resumed, resumed_batches, _ = train(tmp_path / "stopped", 8, resume="latest", grad_accum=2)
    assert start == 4 and resumed_batches == straight_batches[8:]
    assert torch.equal(resumed, straight)


@pytest.mark.parametrize("stop, grad_accum", [(3, 1), (5, 1), (2, 3)])
def test_a_run_stopped_inside_an_epoch_resumes_where_it_stopped(tmp_path, stop, grad_accum):
    # 8 batches an epoch; a checkpoint after `stop` steps lands inside the first or second epoch. The resumed run
    # sees the rest of that epoch's batches, with the same random draws, and ends on the uninterrupted weights.
    keys = dict(checkpoint_every=stop, grad_accum=grad_accum, draws=True)
    total = 4 * stop
    _, _, _, straight, straight_batches, _ = train(tmp_path / "straight", total, **keys)
    train(tmp_path / "stopped", stop, **keys)
    start, end, _, resumed, resumed_batches, _ = train(tmp_path / "stopped", total, resume="latest", **keys)
    assert (start, end) == (stop, total)
    assert resumed_batches == straight_batches[-len(resumed_batches):]
    assert len(resumed_batches) == len(straight_batches) - stop * grad_accum
    assert torch.equal(resumed, straight)


def test_a_loader_that_draws_from_other_generators_than_the_stopped_runs_starts_its_epoch_again(tmp_path, capsys):
    train(tmp_path / "run", 3, checkpoint_every=3, draws=True)
    start, end, *_ = train(tmp_path / "run", 6, resume="latest", checkpoint_every=3, draws=True, own_generator=True)
    assert (start, end) == (3, 6)
    assert "draws from other generators than the stopped run's; its epoch starts again" in capsys.readouterr().out


def test_an_unreadable_loop_state_is_one_line_that_names_it_and_without_it_the_epoch_starts_again(tmp_path):
    train(tmp_path / "run", 3, checkpoint_every=3)
    loop_file = tmp_path / "run" / "checkpoints" / "checkpoint-3" / "loop-state-0.safetensors"
    loop_file.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"loop-state-0.safetensors: cannot be read .*delete it to resume"):
        train(tmp_path / "run", 6, resume="latest", checkpoint_every=3)
    loop_file.unlink()  # as a checkpoint written before the file was kept
    start, end, *_ = train(tmp_path / "run", 6, resume="latest", checkpoint_every=3)
    assert (start, end) == (3, 6)


def test_resume_restores_the_ema_weights_not_a_fresh_average(tmp_path):
    # stopped at an epoch's end (8 batches), so the resumed run sees the straight run's batches
    *_, straight = train(tmp_path / "straight", 16, ema=True)
    train(tmp_path / "stopped", 8, ema=True)
    start, *_, resumed = train(tmp_path / "stopped", 16, resume="latest", ema=True)
    assert start == 8 and torch.equal(resumed, straight)


def test_a_moving_average_is_kept_on_the_runs_device_when_registered_and_after_a_resume(tmp_path, monkeypatch):
    # made before `prepare` moved the model to a GPU, or loaded by a resume onto the CPU, the average's weights met
    # the model's on another device at the first EMA step. A run computing on the meta device stands in for a GPU.
    from diffusers.training_utils import EMAModel

    train(tmp_path / "run", 4, ema=True)  # a checkpoint at step 4 with an EMA in it
    tcfg = TrainConfig(max_steps=8, batch_size=4, checkpoint_every=4)
    run = TrainingRun(tmp_path / "run", tcfg, LoopConfig(train=tcfg), resume="latest")
    monkeypatch.setattr(TrainingRun, "device", property(lambda self: torch.device("meta")))
    average = EMAModel(torch.nn.Linear(3, 1).parameters(), decay=0.9)  # made on the CPU
    run.register(average)
    assert [p.device.type for p in average.shadow_params] == ["meta"] * 2
    assert run.resume() == 4  # the checkpoint's average is loaded onto the CPU, then moved
    assert [p.device.type for p in average.shadow_params] == ["meta"] * 2
    run.finish()


def test_the_last_step_is_logged_whatever_log_every_says(tmp_path):
    train(tmp_path / "four", 10, log_every=4)
    assert logged_steps(tmp_path / "four") == [4, 8, 10]
    train(tmp_path / "zero", 3, log_every=0)  # accepted by the check; logs every step
    assert logged_steps(tmp_path / "zero") == [1, 2, 3]


def test_the_resolved_config_is_saved_in_the_run_folder(tmp_path):
    cfg = LoopConfig(train=TrainConfig(max_steps=3, seed=7), note="hello")
    TrainingRun(tmp_path / "run", cfg.train, cfg).finish()
    assert load_config(LoopConfig, tmp_path / "run" / "config.yaml") == cfg


def test_the_train_seed_seeds_torch_numpy_and_python(tmp_path):
    draws = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        torch.manual_seed(99)
        np.random.seed(99)
        random.seed(99)
        TrainingRun(tmp_path / name, TrainConfig(seed=seed)).finish()
        draws.append((torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()))
    assert draws[0] == draws[1]
    assert all(a != c for a, c in zip(draws[0], draws[2]))


def test_a_stop_python_swallowed_in_a_finalizer_ends_training_at_the_next_step(tmp_path, monkeypatch):
    import signal

    from mitosis_ldm import errors

    steps, step_done = [], TrainingRun.step_done

    def stopped_after_two(run, step, logs=None):
        steps.append(step)
        if step == 3:  # the handler recorded a stop that a __del__ running at that moment swallowed
            monkeypatch.setattr(errors._Stop, "signum", signal.SIGTERM)
        step_done(run, step, logs)

    monkeypatch.setattr(TrainingRun, "step_done", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run", 10)
    assert steps == [1, 2, 3]
