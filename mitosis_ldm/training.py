"""Training plumbing shared by every stage (written once, used by all three).

A stage's `train.py` builds its model and data, then:

    run = TrainingRun(cfg.out, cfg.train, cfg, resume=args.resume, overwrite=args.overwrite)
    model, opt, loader = run.accelerator.prepare(model, opt, loader)
    run.register(ema)                       # anything else with state_dict()
    step = run.resume()                      # 0, or the step of the latest checkpoint
    for batch in run.batches(loader, step):  # endless, epoch-aware
        with run.accelerator.accumulate(model):
            ...
        if run.accelerator.sync_gradients:
            step += 1
            run.step_done(step, {"loss": loss.item()})   # logs, progress, checkpoints
            if step >= cfg.train.max_steps: break
    run.finish()

Run folder layout: `config.yaml` (resolved config), `run.json` (processes that
took part), `logs/metrics.jsonl`, `checkpoints/checkpoint-{step}` (accelerate
state, private to the run, with `loop-state-RANK.safetensors`: where each
process stood in its epoch, so a resume goes on with the same batches) and
`model/` (the exported, shareable artifact).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from .config import load_config, save_config
from .errors import UserError, raise_if_stopped
from .io import check_new_output, write_json
from .loop_state import LoopState, loader_generators, replay, restore, snapshot

CHECKPOINT_PREFIX = "checkpoint-"
LOOP_STATE = "loop-state-{rank}.safetensors"  # where each process's loop stood in its epoch (loop_state.py)


@dataclass
class TrainConfig:
    """The `train:` section every stage shares."""

    max_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "cosine"   # constant | cosine | linear | ... (diffusers.optimization.get_scheduler names)
    lr_warmup_steps: int = 50
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999  # 0 disables EMA
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 25
    seed: int = 0
    num_workers: int = 0


MIXED_PRECISION = ("no", "fp16", "bf16")


def check_train_config(tcfg: TrainConfig, where="train") -> None:
    """One line naming the key for a `train:` value no stage can run with (before any data or model is built).
    `where`: what the line names first, or a function of the key (the YAML file, or `--set` for an override).

    0 keeps its documented meaning where it has one: checkpoint_every 0 saves no checkpoints, max_grad_norm <= 0
    clips nothing, ema_decay 0 keeps no EMA."""
    import math

    from diffusers.optimization import SchedulerType

    def bad(key, rule, value):
        source = where(key) if callable(where) else where
        return UserError(f"{source}: key 'train.{key}' must be {rule}, got {value!r}")

    for key, low in (("max_steps", 1), ("batch_size", 1), ("grad_accum", 1), ("lr_warmup_steps", 0),
                     ("checkpoint_every", 0), ("keep_checkpoints", 0), ("log_every", 0), ("seed", 0),
                     ("num_workers", 0)):
        value = getattr(tcfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(key, f"an integer >= {low}", value)
    if not (isinstance(tcfg.lr, (int, float)) and math.isfinite(tcfg.lr) and tcfg.lr > 0):
        raise bad("lr", "a finite number > 0", tcfg.lr)
    for key in ("weight_decay", "max_grad_norm"):
        if not (isinstance(getattr(tcfg, key), (int, float)) and math.isfinite(getattr(tcfg, key))):
            raise bad(key, "a finite number", getattr(tcfg, key))
    if tcfg.weight_decay < 0:
        raise bad("weight_decay", ">= 0", tcfg.weight_decay)
    if not (isinstance(tcfg.ema_decay, (int, float)) and 0 <= tcfg.ema_decay < 1):
        raise bad("ema_decay", "in [0, 1) (0: no EMA)", tcfg.ema_decay)
    betas = list(tcfg.adam_betas) if isinstance(tcfg.adam_betas, (list, tuple)) else None
    if betas is None or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise bad("adam_betas", "two numbers in [0, 1)", tcfg.adam_betas)
    schedules = [s.value for s in SchedulerType]
    if tcfg.lr_schedule not in schedules:
        raise bad("lr_schedule", f"one of {', '.join(schedules)}", tcfg.lr_schedule)
    if tcfg.mixed_precision not in MIXED_PRECISION:
        raise bad("mixed_precision", f"one of {', '.join(MIXED_PRECISION)}", tcfg.mixed_precision)


def adamw(params, tcfg: TrainConfig, **overrides) -> torch.optim.AdamW:
    """AdamW at the `train:` section's learning rate, betas and weight decay, with the multi-tensor (foreach)
    update on every device. PyTorch picks it by itself only for CUDA tensors; on CPU it takes the diffusion
    demo's optimizer step from 6.2 to 4.4 ms and gives the same weights bit for bit (tests/test_spine.py).
    `overrides` replace any of those (the GAN discriminator's own lr, betas and weight decay)."""
    kwargs = dict(lr=tcfg.lr, betas=tuple(tcfg.adam_betas), weight_decay=tcfg.weight_decay, foreach=True)
    return torch.optim.AdamW(params, **{**kwargs, **overrides})


def train_arg_parser(description: str) -> argparse.ArgumentParser:
    """The flags every `STAGE.train` entry point takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (defaults in code are used without one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--out", help="run folder (overrides the config's `out`)")
    parser.add_argument("--resume", choices=["latest"], help="continue from the latest checkpoint in the run folder")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run folder first")
    return parser


def load_stage_config(cls, args):
    """Resolve a stage config from parsed `train_arg_parser` args."""
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    cfg = load_config(cls, args.config, overrides)
    if isinstance(getattr(cfg, "train", None), TrainConfig):
        overridden = {item.split("=", 1)[0].strip() for item in overrides}
        check_train_config(cfg.train, lambda key: "--set" if f"train.{key}" in overridden else args.config)
    return cfg


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


class TrainingRun:
    """Accelerator set-up, run-folder safety, logging, checkpoints and resume."""

    def __init__(self, run_dir, train: TrainConfig, full_config=None, resume: str | None = None,
                 overwrite: bool = False, project_name: str = "mitosis-ldm"):
        check_train_config(train)  # callers from Python; the entry points checked it before building anything
        self.run_dir = Path(run_dir)
        self.train = train
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.accelerator = Accelerator(
            # Without a GPU, `accelerate launch --multi_gpu` processes must be told to use
            # the CPU so that accelerate joins them over gloo instead of running each alone.
            cpu=not torch.cuda.is_available(),
            mixed_precision=train.mixed_precision,
            gradient_accumulation_steps=train.grad_accum,
            log_with="tensorboard" if tensorboard_available() else None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
        )
        self._prepare_run_dir(resume, overwrite)
        set_seed(train.seed, device_specific=True)
        self._extra_state = []
        self._resume_requested = resume
        self._bar = None
        self._loop: LoopState | None = None          # where `batches` stands: epoch, batches taken, random states
        self._loop_generators: list = []
        self._loop_resume: tuple[int, LoopState] | None = None  # (step, state) read from the resumed checkpoint
        self._t0 = time.time()
        self._last_log: dict = {}
        if self.is_main:
            if full_config is not None:
                save_config(full_config, self.run_dir / "config.yaml")
            if self.accelerator.log_with:
                cfg_flat = _flatten(dataclasses.asdict(full_config)) if full_config is not None else {}
                self.accelerator.init_trackers(project_name, config={k: v for k, v in cfg_flat.items()
                                                                     if isinstance(v, (int, float, str, bool))})
        self._write_run_info()

    # -- properties -------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"

    # -- set-up -----------------------------------------------------------
    def _prepare_run_dir(self, resume, overwrite):
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"{self.run_dir}: is a file; the run folder must be a folder")
        check_new_output(self.run_dir, overwrite=True)  # a file on its path, or an unwritable folder
        has_content = self.run_dir.exists() and any(self.run_dir.iterdir())
        if has_content and not resume and not overwrite:
            raise UserError(f"{self.run_dir}: run folder already exists; pass --resume latest to continue it "
                            f"or --overwrite to start again")
        if resume and not self.run_dir.exists():
            raise UserError(f"{self.run_dir}: --resume latest given but the run folder does not exist")
        self.accelerator.wait_for_everyone()  # every process has looked before the main one writes
        if self.is_main:
            if has_content and overwrite and not resume:
                shutil.rmtree(self.run_dir)
            (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()

    def _write_run_info(self):
        rank = torch.tensor([self.accelerator.process_index], device=self.device)
        ranks = self.accelerator.gather(rank).tolist()
        if self.is_main:
            write_json(self.run_dir / "run.json", {
                "num_processes": self.accelerator.num_processes,
                "process_ranks": sorted(int(r) for r in ranks),
                "distributed_type": str(self.accelerator.distributed_type),
                "mixed_precision": self.accelerator.mixed_precision,
                "device": str(self.device),
                "torch": torch.__version__,
            })

    def register(self, *objects):
        """Track extra stateful objects (EMA, scalers) in checkpoints; a moving average goes to the run's device."""
        for obj in objects:
            if obj is not None:
                self.accelerator.register_for_checkpointing(obj)
                self._extra_state.append(obj)
                self._to_device(obj)

    def _to_device(self, obj) -> None:
        # diffusers' EMAModel keeps its weights where they were made (often before `prepare` moved the model to a
        # GPU), and a checkpoint loads them onto the CPU: `step` would then meet the model's weights on another device
        if hasattr(obj, "shadow_params") and callable(getattr(obj, "to", None)):
            obj.to(self.device)

    # -- checkpoints ------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        found = []
        if self.ckpt_dir.exists():
            for path in self.ckpt_dir.iterdir():
                if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX):
                    suffix = path.name[len(CHECKPOINT_PREFIX):]
                    if suffix.isdigit():
                        found.append((int(suffix), path))
        return sorted(found)

    def resume(self) -> int:
        """Load the latest checkpoint when `--resume latest` was given; return its step."""
        if not self._resume_requested:
            return 0
        found = self.checkpoints()
        if not found:
            self.accelerator.print(f"{self.ckpt_dir}: no checkpoint yet, starting from step 0")
            return 0
        step, path = found[-1]
        self.accelerator.load_state(str(path))
        for obj in self._extra_state:
            self._to_device(obj)
        loop_file = path / LOOP_STATE.format(rank=self.accelerator.process_index)
        if loop_file.exists():  # checkpoints written before it was kept resume at the epoch's start
            try:
                self._loop_resume = (step, LoopState.load(loop_file))
            except Exception as error:  # noqa: BLE001 - any unreadable file is the same answer to the user
                raise UserError(f"{loop_file}: cannot be read ({type(error).__name__}); delete it to resume "
                                f"from the start of the checkpoint's epoch") from None
        self.accelerator.print(f"resumed from {path} (step {step})")
        return step

    def save_checkpoint(self, step: int) -> Path:
        """accelerate state to a temporary folder, renamed into place; keep the last K."""
        final = self.ckpt_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.ckpt_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp), safe_serialization=True)
        if self._loop is not None:
            self._loop.current = snapshot(self._loop_generators)
            self._loop.save(tmp / LOOP_STATE.format(rank=self.accelerator.process_index))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in self.checkpoints()[:-max(1, self.train.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    # -- the loop ---------------------------------------------------------
    def batches(self, loader, start_step: int = 0):
        """Yield batches forever, advancing the sampler's epoch each pass. Resumed from a checkpoint inside an
        epoch, it goes on with that epoch's remaining batches and random draws (loop_state.py)."""
        if start_step >= self.train.max_steps:
            return
        generators = self._loop_generators = loader_generators(loader)
        resumed = self._loop_resume[1] if self._loop_resume and self._loop_resume[0] == start_step else None
        self._loop_resume = None
        if resumed is not None and len(resumed.epoch_start["generators"]) != len(generators):
            self.accelerator.print(f"{self.run_dir}: the data loader draws from other generators than the stopped "
                                   f"run's; its epoch starts again from the first batch")
            resumed = None
        steps_per_epoch = max(1, len(loader) // max(1, self.train.grad_accum))
        epoch = resumed.epoch if resumed is not None else start_step // steps_per_epoch
        self._bar = tqdm(total=self.train.max_steps, initial=start_step, disable=not self.is_main,
                         desc=self.run_dir.name, dynamic_ncols=True)
        while True:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
                loader.sampler.set_epoch(epoch)
            if resumed is not None:
                restore(resumed.epoch_start, generators)
            epoch_start = snapshot(generators)
            batches = iter(loader)
            taken = 0
            if resumed is not None:  # take the batches the stopped run used, then its state at the step
                taken = replay(batches, resumed, generators)
                restore(resumed.current, generators)
                self._loop, resumed = LoopState(epoch, taken, epoch_start, resumed.before), None
            while True:
                before = snapshot(generators)
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                taken += 1
                self._loop = LoopState(epoch, taken, epoch_start, before)
                yield batch
            epoch += 1

    def step_done(self, step: int, logs: dict | None = None) -> None:
        """Call once per optimizer step: progress, logging and periodic checkpoints."""
        raise_if_stopped()  # a stop swallowed in a finalizer would leave the run training to its last step
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if self._bar is not None:
            self._bar.update(1)
            if logs:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
        if logs and (step % max(1, self.train.log_every) == 0 or step == self.train.max_steps):
            self.log(step, logs)
        if self.train.checkpoint_every > 0 and step % self.train.checkpoint_every == 0:
            self.save_checkpoint(step)

    def log(self, step: int, logs: dict) -> None:
        """Metrics to logs/metrics.jsonl (always) and TensorBoard (when installed)."""
        if self.accelerator.log_with:
            self.accelerator.log(logs, step=step)
        if self.is_main:
            record = {"step": step, "time_s": round(time.time() - self._t0, 3), **logs}
            with open(self.run_dir / "logs" / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def elapsed(self) -> float:
        return time.time() - self._t0

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self.accelerator.wait_for_everyone()
        if self.accelerator.log_with:
            self.accelerator.end_training()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
