"""Train the classifier ensemble: K members, each its own seed, early-stopped on validation loss.

    accelerate launch -m classifier.train --config configs/demo/classifier.yaml \
        [--set data.dataset=DIR] [--out RUN] [--member k] [--resume latest] [--overwrite]

One launch trains all K members one after another; `--member k` trains only
member k (one job of a job array) and the launch that finishes the last member
assembles the exported folder `RUN/model/` (config.json + member-K.safetensors).
Each member has its own run folder `RUN/members/member-k/` with checkpoints,
logs and, when done, `member.safetensors` + `member.json`.

The loss is BCE-with-logits against the soft label (the fraction of experts
who called the patch mitotic) or the hard label; batches are balanced between
mitotic and non-mitotic patches; after training each member gets a Platt
calibration (logit scale and bias) fitted on the validation split, which also
undoes the prior shift that balanced sampling introduces. Only real, labelled
patches are used: generated data and unlabelled rows are refused (a downstream
classifier, e.g. bench/cas.py's, opts in with `data.allow_generated`).
Mixtures: `data.datasets` + `data.weights`; few labels: `data.fraction` (see
classifier/mixture.py).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, WeightedRandomSampler

from mitosis_ldm.config import save_config
from mitosis_ldm.errors import UserError, check_at_least, user_errors
from mitosis_ldm.io import write_json
from mitosis_ldm.launch import process_state, release_processes
from mitosis_ldm.training import TrainConfig, TrainingRun, adamw, load_stage_config, train_arg_parser
from patches.dataset import AugmentConfig, PatchDataset

from .fitting import EarlyStopping, fit_platt, lr_scheduler, val_logits
from .mixture import Mixture, check_mixture, is_generated, keep_fraction, sampling_weights
from .model import ClassifierEnsemble, MitosisClassifier, ModelConfig, fit_size


@dataclass
class DataConfig:
    dataset: str = "runs/demo/data/synth"  # a patch dataset with train and val splits
    label_mode: str = "soft"               # soft (target = vote fraction) | hard | binned
    balance: float = 0.5                   # fraction of mitotic patches per batch; 0 = as stored
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    datasets: list[str] = field(default_factory=list)  # a mixture (replaces `dataset`): train + val of each
    weights: list[float] = field(default_factory=list)  # each dataset's share of the draws (default equal)
    fraction: float = 1.0                  # keep this stratified fraction of each real train split
    fraction_seed: int = 0
    allow_generated: bool = False          # downstream (CAS) classifiers only: the judge never sees generated data


@dataclass
class EnsembleConfig:
    members: int = 3
    eval_every: int = 100      # optimizer steps between validation passes
    patience: int = 5          # validation passes without improvement before stopping
    min_delta: float = 1e-4
    calibrate: bool = True     # Platt scale + bias per member on the validation split


@dataclass
class ClassifierConfig:
    out: str = "runs/classifier"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=3000, batch_size=64, lr=1e-3,
                                                                   weight_decay=0.05, ema_decay=0.0,
                                                                   checkpoint_every=500, log_every=25))


# -- data ----------------------------------------------------------------------

def load_training_data(cfg: ClassifierConfig):
    """Train and val sets (one dataset, or a `Mixture` of `data.datasets`), `data.fraction` of the real labels."""
    roots = cfg.data.datasets or [cfg.data.dataset]
    shares = check_mixture(cfg.data.datasets, cfg.data.weights, cfg.data.fraction)
    trains, vals = zip(*[load_one(cfg, Path(root)) for root in roots])
    for train in trains:
        if not is_generated(train):
            keep_fraction(train, cfg.data.fraction, cfg.data.fraction_seed)
    if len(roots) == 1:
        return trains[0], vals[0]
    return Mixture(list(trains), shares), Mixture(list(vals))


def load_one(cfg: ClassifierConfig, root: Path):
    """One dataset's train and val splits, refusing generated data, unlabelled rows and size mismatches."""
    train = PatchDataset(root, split="train", augment=cfg.data.augment, label_mode=cfg.data.label_mode)
    val = PatchDataset(root, split="val", augment=None, label_mode=cfg.data.label_mode)
    if is_generated(train) and not cfg.data.allow_generated:
        raise UserError(f"{root / 'dataset.json'}: field 'source' says generated data; the classifier is the "
                        f"independent judge and never trains on generated patches (a downstream classifier may: "
                        f"--set data.allow_generated=true)")
    for name, ds in (("train", train), ("val", val)):
        if len(ds) == 0:
            raise UserError(f"{root / 'labels.csv'}: field 'split' has no '{name}' rows; the classifier needs "
                            f"labelled train and val splits")
        targets = ds.labels()
        missing = np.flatnonzero(np.isnan(targets))
        if len(missing):
            column = "hard_label" if cfg.data.label_mode == "hard" else "label"
            raise UserError(f"{root / 'labels.csv'}: field '{column}' is empty for {len(missing)} of {len(ds)} "
                            f"{name} rows (first id '{ds.ids()[missing[0]]}'); the classifier trains on "
                            f"labelled patches only")
    size = cfg.data.augment.crop or train.patch_size
    if size != cfg.model.input_size:
        raise UserError(f"model.input_size: is {cfg.model.input_size} but {root} gives {size}x{size} training "
                        f"patches (patch_size {train.patch_size}, augment.crop {cfg.data.augment.crop})")
    return train, val


def balanced_sampler(train: PatchDataset | Mixture, balance: float, seed: int):
    """Draw mitotic (hard label 1, or soft >= 0.5) patches with probability `balance` (within each dataset)."""
    parts, shares = (train.parts, train.shares) if isinstance(train, Mixture) else ([train], [1.0])
    weights = sampling_weights(parts, shares, balance)
    if weights is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=len(train),
                                 replacement=True, generator=generator)


# -- one member ---------------------------------------------------------------------

def member_dir(run_root: Path, k: int) -> Path:
    return run_root / "members" / f"member-{k}"


def member_done(run_root: Path, k: int, max_steps: int) -> bool:
    """Member k is written and has nothing left to train: it stopped early or ran `max_steps` steps. One that
    reached a lower `train.max_steps` goes on from its last checkpoint, as the other stages' runs do."""
    folder = member_dir(run_root, k)
    if not ((folder / "member.json").exists() and (folder / "member.safetensors").exists()):
        return False
    record = json.loads((folder / "member.json").read_text())
    return bool(record["stopped_early"]) or int(record["steps"]) >= max_steps


def train_member(cfg: ClassifierConfig, k: int, train_ds: PatchDataset, val_ds: PatchDataset,
                 resume: str | None, overwrite: bool) -> None:
    run_root = Path(cfg.out)
    folder = member_dir(run_root, k)
    seed = cfg.train.seed + k
    tcfg = replace(cfg.train, seed=seed)
    run = TrainingRun(folder, tcfg, cfg, resume=resume, overwrite=overwrite)
    acc = run.accelerator
    acc.print(f"member {k}: seed {seed}, {len(train_ds)} train / {len(val_ds)} val patches, "
              f"{acc.num_processes} process(es)")

    torch.manual_seed(seed)  # same initial weights on every process
    model = MitosisClassifier(cfg.model)
    opt = adamw(model.parameters(), tcfg)
    scheduler = lr_scheduler(opt, tcfg)
    sampler = balanced_sampler(train_ds, cfg.data.balance, seed)
    loader = DataLoader(train_ds, batch_size=tcfg.batch_size, sampler=sampler, shuffle=sampler is None,
                        drop_last=True, num_workers=tcfg.num_workers,
                        generator=torch.Generator().manual_seed(seed) if sampler is None else None)
    model, opt, loader = acc.prepare(model, opt, loader)
    plain = acc.unwrap_model(model)
    ema = None
    if tcfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(plain, decay=tcfg.ema_decay)
    early = EarlyStopping(plain, cfg.ensemble.patience, cfg.ensemble.min_delta)
    run.register(scheduler, ema, early)  # the LR schedule is stepped once per optimizer step, by us

    val_images = np.stack([fit_size(im, cfg.model.input_size) for im in val_ds.uint8()])
    val_targets = torch.from_numpy(val_ds.labels())

    step = run.resume()
    acc.print(f"member {k}: starting at step {step}")
    stopped_early = step > 0 and int(early.bad_evals) >= early.patience
    for batch in ([] if stopped_early else run.batches(loader, step)):
        images = (batch["image"] + 1.0) * 127.5  # (B, 3, P, P) in [0, 255], as at scoring time
        with acc.accumulate(model):
            logits = model(images)  # (B,)
            loss = F.binary_cross_entropy_with_logits(logits, batch["label"])
            acc.backward(loss)
            if acc.sync_gradients and tcfg.max_grad_norm > 0:
                acc.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if not acc.sync_gradients:
            continue
        step += 1
        scheduler.step()
        if ema is not None:
            ema.update(plain, step=step)
        logs = {"loss": acc.reduce(loss.detach(), "mean").item(), "lr": scheduler.get_last_lr()[0]}
        if step % cfg.ensemble.eval_every == 0 or step >= tcfg.max_steps:
            judged = ema.module if ema is not None else plain
            logits_val = val_logits(judged, val_images)
            # every process judges the same weights; averaging makes their stop decisions identical
            val_loss = F.binary_cross_entropy_with_logits(logits_val, val_targets)  # on the CPU, as val_logits gives
            val_loss = acc.reduce(val_loss.to(acc.device), "mean").item()  # NCCL reduces only GPU tensors
            stopped_early = early.update(val_loss, judged, step)
            logs.update(val_loss=val_loss, best_val_loss=float(early.best_loss))
            if step % max(1, tcfg.log_every) and step != tcfg.max_steps:
                run.log(step, logs)  # step_done logs this step itself otherwise
        run.step_done(step, logs)
        if stopped_early or step >= tcfg.max_steps:
            break
    run.finish()
    if stopped_early:
        acc.print(f"member {k}: early stop at step {step} (best val loss {float(early.best_loss):.4f} "
                  f"at step {int(early.best_step)})")
    if acc.is_main_process:
        best = early.best if math.isfinite(float(early.best_loss)) else (ema.module if ema is not None else plain)
        scale, bias = 1.0, 0.0
        if cfg.ensemble.calibrate:
            scale, bias = fit_platt(val_logits(best, val_images), val_targets)
        cal_loss = F.binary_cross_entropy_with_logits(scale * val_logits(best, val_images) + bias, val_targets).item()
        weights = folder / "member.safetensors"
        tmp = folder / ".member.safetensors.tmp"
        save_file({n: t.detach().contiguous().cpu() for n, t in best.net.state_dict().items()}, str(tmp))
        tmp.replace(weights)
        write_json(folder / "member.json", {   # written last: marks the member as finished
            "member": k, "seed": seed, "steps": step, "stopped_early": bool(stopped_early),
            "best_step": int(early.best_step), "best_val_loss": float(early.best_loss),
            "calibration": {"scale": scale, "bias": bias}, "calibrated_val_loss": cal_loss,
        })
        acc.print(f"member {k}: done; val loss {float(early.best_loss):.4f} -> {cal_loss:.4f} after calibration "
                  f"(scale {scale:.3f}, bias {bias:+.3f})")
    acc.wait_for_everyone()


def assemble(cfg: ClassifierConfig, train_ds: PatchDataset) -> Path:
    """Write RUN/model/ from the K finished members (replacing an older one of this run)."""
    run_root = Path(cfg.out)
    members, seeds, calibration, info = [], [], [], []
    for k in range(cfg.ensemble.members):
        folder = member_dir(run_root, k)
        record = json.loads((folder / "member.json").read_text())
        member = MitosisClassifier(cfg.model, pretrained=False)
        member.net.load_state_dict(load_file(str(folder / "member.safetensors")))
        members.append(member)
        seeds.append(int(record["seed"]))
        calibration.append((record["calibration"]["scale"], record["calibration"]["bias"]))
        info.append(record)
    extra = {
        "label_mode": cfg.data.label_mode,
        "trained_on": {"dataset": str(cfg.data.dataset), "content_hash": train_ds.meta.get("content_hash")}
        if not cfg.data.datasets and cfg.data.fraction == 1 else
        {"datasets": list(cfg.data.datasets or [cfg.data.dataset]), "weights": list(cfg.data.weights),
         "fraction": cfg.data.fraction, "fraction_seed": cfg.data.fraction_seed, "patches": len(train_ds),
         "content_hashes": (train_ds.meta["parts"] if isinstance(train_ds, Mixture)
                            else [train_ds.meta.get("content_hash")])},
        "val_loss": [r["calibrated_val_loss"] for r in info],
        "best_step": [r["best_step"] for r in info],
    }
    ensemble = ClassifierEnsemble(cfg.model, members, seeds, calibration, extra)
    return ensemble.save_pretrained(run_root / "model", overwrite=True)


# -- entry point ---------------------------------------------------------------------

def prepare_run_root(cfg: ClassifierConfig, args, state) -> None:
    """Run-folder safety for the whole ensemble (a single member's folder is TrainingRun's business)."""
    root = Path(cfg.out)
    if args.member is not None:
        return  # job arrays: other members may be training into the same RUN right now
    has_content = root.exists() and any(root.iterdir())
    if has_content and not args.resume and not args.overwrite:
        raise UserError(f"{root}: run folder already exists; pass --resume latest to continue it "
                        f"or --overwrite to start again")
    if args.resume and not root.exists():
        raise UserError(f"{root}: --resume latest given but the run folder does not exist")
    state.wait_for_everyone()
    if state.is_main_process and has_content and args.overwrite and not args.resume:
        shutil.rmtree(root)
    state.wait_for_everyone()


def check_config(cfg: ClassifierConfig) -> None:
    """One line naming the key for an ensemble, model or augmentation value the stage cannot train with."""
    from patches.augment import check_augment

    from .model import UPSAMPLE_RANGE

    check_at_least(cfg.ensemble.members, "ensemble.members")
    if cfg.data.label_mode not in ("soft", "hard", "binned"):
        raise UserError(f"data.label_mode: must be soft, hard or binned, got '{cfg.data.label_mode}'")
    check_at_least(cfg.ensemble.eval_every, "ensemble.eval_every")
    # a patience below 1 ended every member at its first validation pass
    check_at_least(cfg.ensemble.patience, "ensemble.patience")
    if not 0 <= cfg.ensemble.min_delta < float("inf"):
        raise UserError(f"ensemble.min_delta: must be a finite number >= 0, got {cfg.ensemble.min_delta}")
    low, high = UPSAMPLE_RANGE
    if isinstance(cfg.model.upsample, bool) or not isinstance(cfg.model.upsample, int) \
            or not low <= cfg.model.upsample <= high:
        # the range a classifier folder's config.json is checked against on loading: outside it, training ran
        # to the end and wrote a folder that `score` and `evaluate` refuse
        raise UserError(f"model.upsample: must be an integer in [{low}, {high}], got {cfg.model.upsample!r}")
    check_augment(cfg.data.augment, "data.augment.")


@user_errors
def main(argv=None):
    parser = train_arg_parser("Train the mitosis classifier ensemble (K members, different seeds).")
    parser.add_argument("--member", type=int, help="train only member k (0-based), e.g. one job of a job array")
    args = parser.parse_args(argv)
    cfg = load_stage_config(ClassifierConfig, args)
    check_config(cfg)
    if args.member is not None and not 0 <= args.member < cfg.ensemble.members:
        raise UserError(f"--member: {args.member} is outside 0..{cfg.ensemble.members - 1} (ensemble.members)")
    MitosisClassifier(replace(cfg.model, pretrained=False))  # bad model names/kwargs fail before any output
    if cfg.model.pretrained:
        MitosisClassifier(cfg.model)  # an unreachable hub fails here, before any output
    train_ds, val_ds = load_training_data(cfg)
    if len(train_ds) < cfg.train.batch_size:
        raise UserError(f"train.batch_size: {cfg.train.batch_size} is larger than the train split "
                        f"({len(train_ds)} patches)")
    balanced_sampler(train_ds, cfg.data.balance, cfg.train.seed)  # a one-class split fails before any output

    state = process_state()
    prepare_run_root(cfg, args, state)
    root = Path(cfg.out)
    if state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, root / "config.yaml")
    todo = [args.member] if args.member is not None else list(range(cfg.ensemble.members))
    for k in todo:
        folder = member_dir(root, k)
        if member_done(root, k, cfg.train.max_steps) and (args.resume or args.member is None) and not args.overwrite:
            state.print(f"member {k}: already finished ({folder / 'member.json'})")
            continue
        resume = args.resume if (args.resume and folder.exists()) else None
        train_member(cfg, k, train_ds, val_ds, resume=resume, overwrite=args.overwrite and args.member is not None)
    done = [k for k in range(cfg.ensemble.members) if member_done(root, k, cfg.train.max_steps)]
    if state.is_main_process:
        if len(done) == cfg.ensemble.members:
            path = assemble(cfg, train_ds)
            print(f"classifier ensemble ({len(done)} members) written to {path}")
        else:
            print(f"{len(done)} of {cfg.ensemble.members} members finished; {root / 'model'} is written by the "
                  f"launch that finishes the last one")
    release_processes()


if __name__ == "__main__":
    main()
