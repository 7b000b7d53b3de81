"""Train the label-conditioned latent UNet on a latent cache.

    accelerate launch -m diffusion.train --config configs/demo/diffusion.yaml \
        [--set out=runs/demo/diffusion] [--set data.cache=runs/demo/latents] [--resume latest] [--overwrite]

The config names a latent cache (`data.cache`), or a VAE plus patch datasets
(`data.vae`, `data.datasets`), in which case the cache is built on the first
run (at `data.cache`, or `RUN/latents`). Training never runs the VAE's
encoder. Rows without a label (NaN, e.g. real CMU nuclei) always train under
the null label, so they are learned unconditionally; labelled rows drop to the
null label with probability `diffusion.cond_dropout` (classifier-free guidance).
The EMA weights are exported to `RUN/model/` as a pipeline folder; a preview
transition strip is written to `RUN/previews/` every `preview.every` steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from mitosis_ldm.errors import UserError, check_at_least, user_errors
from mitosis_ldm.launch import release_processes
from mitosis_ldm.training import TrainConfig, TrainingRun, adamw, load_stage_config, train_arg_parser

from .cache import SPLIT_CODES, LatentCache, build_cache, check_cache
from .export import export, save_guide_snapshot, write_preview
from .model import Denoiser, ModelConfig, build_models, count_parameters


@dataclass
class DataConfig:
    cache: str | None = None           # latent cache folder (built here when missing and vae+datasets are given)
    vae: str | None = None             # autoencoder folder; with datasets, builds the cache; with cache, checks it
    datasets: list[str] = field(default_factory=list)
    cache_mode: str = "mean"           # mean | sample (when the cache is built here)
    cache_dihedral: bool = False
    splits: list[str] = field(default_factory=lambda: ["train"])
    label_mode: str = "soft"           # soft | binned | hard
    balanced: bool = True              # equal weight per label bin (and for unlabelled rows)
    balance_bins: int = 5
    unlabelled_weight: float = 1.0     # weight of the unlabelled group relative to one label bin
    label_jitter: float = 0.0          # std of Gaussian noise on labels (clipped to [0, 1]): smoother y -> image


@dataclass
class DiffusionConfig:
    prediction_type: str = "v_prediction"  # epsilon | v_prediction
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    min_snr_gamma: float = 5.0             # 0 disables min-SNR weighting
    cond_dropout: float = 0.5


@dataclass
class SampleConfig:
    """Defaults stored in pipeline.json (what `mitosis-ldm transitions` uses when flags are omitted)."""

    guidance: float = 3.0
    steps: int = 20
    sampler: str = "dpm++"
    # real2gen starts from a real (often unlabelled, other-domain) patch: milder guidance keeps its identity
    real2gen_guidance: float = 2.0
    real2gen_strength: float = 1.0   # fraction of the schedule `real2gen --mode invert` inverts (1 = all of it)
    # the transitions' guidance schedule: guide only on this noise-level interval (t / T), and rescale the
    # guided prediction toward the conditional one's std by this factor (0 = plain classifier-free guidance)
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    guidance_rescale: float = 0.0
    # autoguidance: keep the EMA weights at this step as the pipeline's weak guide model (guide/; 0 = none),
    # and what transitions and generate guide against by default: "null" (classifier-free) or "weak"
    guide_snapshot_step: int = 0
    guide: str = "null"
    # add null_guidance x (conditional - null-label prediction) inside the interval, to either guide; keep
    # null_guidance_middle x that term at y = 0.5, easing back to the whole term at y = 0 and 1 (1 = flat), at
    # noise levels t/T <= null_guidance_middle_below only (the whole term above; 1 = at every level)
    null_guidance: float = 0.0
    null_guidance_middle: float = 1.0
    null_guidance_middle_below: float = 1.0


@dataclass
class PreviewConfig:
    every: int = 500  # 0 disables
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    conditions: int = 6


@dataclass
class DiffusionTrainConfig:
    out: str = "runs/diffusion"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr_warmup_steps=100))


class LatentRows(Dataset):
    """Cached latents (one random dihedral variant per draw when the cache holds 8) and labels."""

    def __init__(self, latents: np.ndarray, labels: np.ndarray):
        self.latents = latents  # (n, V, C, h, w) float16
        self.labels = labels    # (n,) float32, NaN = unlabelled

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int):
        v = int(torch.randint(self.latents.shape[1], (1,))) if self.latents.shape[1] > 1 else 0
        return torch.from_numpy(self.latents[i, v].astype(np.float32)), torch.tensor(self.labels[i])


def balance_weights(labels: np.ndarray, bins: int, unlabelled_weight: float) -> np.ndarray:
    """Per-row sampling weights: every non-empty label bin draws equally often; NaN rows form their own group."""
    weights = np.zeros(len(labels), np.float64)
    nan = np.isnan(labels)
    which = np.clip((np.nan_to_num(labels) * bins).astype(int), 0, bins - 1)
    for b in range(bins):
        rows = (~nan) & (which == b)
        if rows.any():
            weights[rows] = 1.0 / rows.sum()
    if nan.any():
        weights[nan] = unlabelled_weight / nan.sum()
    return weights


def label_statistics(labels: np.ndarray) -> dict:
    labelled = labels[~np.isnan(labels)]
    hist, edges = np.histogram(labelled, bins=10, range=(0, 1))
    stats = {"count": int(len(labels)), "labelled": int(len(labelled)), "unlabelled": int(np.isnan(labels).sum()),
             "histogram": hist.tolist(), "bin_edges": edges.round(3).tolist()}
    if len(labelled):
        values = np.unique(labelled.round(4))
        stats.update(mean=float(labelled.mean()), std=float(labelled.std()), min=float(labelled.min()),
                     max=float(labelled.max()), distinct_values=values.tolist() if len(values) <= 20 else len(values))
    return stats


def resolve_cache(cfg: DiffusionTrainConfig, run: TrainingRun) -> Path:
    """Find, check or build the latent cache (built once, by the main process)."""
    data = cfg.data
    path = Path(data.cache) if data.cache else run.run_dir / "latents"
    if not (path / "cache.json").exists():
        if not (data.vae and data.datasets):
            raise UserError(f"{path}: latent cache not found; set data.cache to an existing cache, or data.vae and "
                            f"data.datasets to build one")
        if run.is_main:
            build_cache(data.vae, data.datasets, path, data.cache_mode, data.cache_dihedral, overwrite=False,
                        seed=cfg.train.seed, splits=data.splits)  # only what training reads
        run.accelerator.wait_for_everyone()
    check_cache(path, data.vae, data.datasets or None)
    return path


def make_noise_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"diffusion.prediction_type: must be epsilon or v_prediction, got '{cfg.prediction_type}'")
    # latents are not confined to [-1, 1], so no x0 clipping
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False)


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma weights (Hang et al. 2023), in the form for the prediction type."""
    if gamma <= 0:
        return torch.ones(len(timesteps))
    alpha = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha / (1 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr


def check_config(cfg: DiffusionTrainConfig) -> None:
    if cfg.data.label_mode not in ("soft", "binned", "hard"):
        raise UserError(f"data.label_mode: must be soft, binned or hard, got '{cfg.data.label_mode}'")
    for name in cfg.data.splits:
        if name not in SPLIT_CODES:
            raise UserError(f"data.splits: unknown split '{name}' (train, val, test)")
    if not 0 <= cfg.diffusion.cond_dropout <= 1:
        raise UserError(f"diffusion.cond_dropout: must be in [0, 1], got {cfg.diffusion.cond_dropout}")
    if cfg.data.cache_mode not in ("mean", "sample"):
        raise UserError(f"data.cache_mode: must be mean or sample, got '{cfg.data.cache_mode}'")
    check_at_least(cfg.data.balance_bins, "data.balance_bins")
    for key, value, note in (("data.label_jitter", cfg.data.label_jitter, ""),
                             ("data.unlabelled_weight", cfg.data.unlabelled_weight, ""),
                             ("diffusion.min_snr_gamma", cfg.diffusion.min_snr_gamma, " (0 disables)")):
        if not 0 <= value < float("inf"):
            raise UserError(f"{key}: must be a finite number >= 0{note}, got {value}")
    if cfg.diffusion.num_train_timesteps < 2:
        raise UserError(f"diffusion.num_train_timesteps: must be >= 2, got {cfg.diffusion.num_train_timesteps}")
    try:
        make_noise_scheduler(cfg.diffusion)
    except (NotImplementedError, ValueError):
        raise UserError(f"diffusion.beta_schedule: diffusers' DDPMScheduler has no schedule "
                        f"'{cfg.diffusion.beta_schedule}'") from None
    if cfg.preview.every < 0:
        raise UserError(f"preview.every: must be >= 0 (0: no previews), got {cfg.preview.every}")
    if cfg.preview.every and (cfg.preview.conditions < 1 or not cfg.preview.seeds
                              or min(cfg.preview.seeds) < 0):
        # otherwise found only at the first preview step, minutes into the run
        raise UserError(f"preview: needs conditions >= 1 and one or more seeds >= 0 (or every: 0), got conditions "
                        f"{cfg.preview.conditions} and seeds {cfg.preview.seeds}")
    from .model import PRESETS
    from .schedulers import SAMPLERS
    from .sampling_args import (GUIDES, check_guidance_schedule, check_null_guidance, check_null_guidance_middle,
                                check_null_guidance_middle_below)

    if cfg.model.preset not in PRESETS:
        raise UserError(f"model.preset: must be one of {', '.join(PRESETS)}, got '{cfg.model.preset}'")
    if cfg.sample.sampler not in SAMPLERS:
        raise UserError(f"sample.sampler: must be one of {', '.join(SAMPLERS)}, got '{cfg.sample.sampler}'")
    if min(cfg.sample.guidance, cfg.sample.real2gen_guidance) < 0 or cfg.sample.steps < 1:
        raise UserError("sample: field 'guidance' must be >= 0 and 'steps' >= 1")
    if not 0 < cfg.sample.real2gen_strength <= 1:
        raise UserError(f"sample.real2gen_strength: must be in (0, 1], got {cfg.sample.real2gen_strength:g}")
    check_guidance_schedule(cfg.sample.guidance_interval, cfg.sample.guidance_rescale,
                            "sample.guidance_interval", "sample.guidance_rescale")
    if cfg.sample.guide not in GUIDES:
        raise UserError(f"sample.guide: must be one of {', '.join(GUIDES)}, got '{cfg.sample.guide}'")
    check_null_guidance(cfg.sample.null_guidance, "sample.null_guidance")
    check_null_guidance_middle(cfg.sample.null_guidance_middle, "sample.null_guidance_middle")
    check_null_guidance_middle_below(cfg.sample.null_guidance_middle_below, "sample.null_guidance_middle_below")
    snapshot = cfg.sample.guide_snapshot_step
    if isinstance(snapshot, bool) or not isinstance(snapshot, int) or not 0 <= snapshot < cfg.train.max_steps:
        raise UserError(f"sample.guide_snapshot_step: must be an integer in [0, train.max_steps), got {snapshot!r}")
    if cfg.sample.guide == "weak" and snapshot == 0:
        raise UserError("sample.guide: 'weak' needs a guide model; set sample.guide_snapshot_step "
                        "(or attach one later with mitosis-ldm guide)")


def train(cfg: DiffusionTrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    from patches.dataset import condition_labels

    check_config(cfg)
    run = TrainingRun(cfg.out, cfg.train, cfg, resume=resume, overwrite=overwrite)
    acc = run.accelerator
    cache_dir = resolve_cache(cfg, run)
    cache = LatentCache(cache_dir)
    encoded = cache.info.get("splits")  # None: every split
    missing = [s for s in cfg.data.splits if encoded is not None and s not in encoded]
    if missing:  # otherwise the run trains on the rows it has, without a word
        wanted = " ".join(f"--split {s}" for s in dict.fromkeys([*encoded, *cfg.data.splits]))
        raise UserError(f"{cache_dir}: latent cache encodes split(s) {', '.join(encoded)}, not {', '.join(missing)} "
                        f"(field 'data.splits'); rebuild it with mitosis-ldm cache --overwrite {wanted}")
    keep = np.isin(cache.splits, [SPLIT_CODES[s] for s in cfg.data.splits])
    if not keep.any():
        raise UserError(f"{cache_dir}: no rows in splits {cfg.data.splits} (field 'data.splits')")
    labels = condition_labels(cache.labels[keep], cache.hard_labels[keep], cfg.data.label_mode)
    rows = LatentRows(cache.latents[keep], labels)
    weights = balance_weights(labels, cfg.data.balance_bins, cfg.data.unlabelled_weight) if cfg.data.balanced \
        else np.ones(len(labels))
    sampler = WeightedRandomSampler(torch.as_tensor(weights), num_samples=len(rows), replacement=True)
    loader = DataLoader(rows, batch_size=cfg.train.batch_size, sampler=sampler,
                        drop_last=len(rows) >= cfg.train.batch_size,
                        num_workers=cfg.train.num_workers)

    channels, size, _ = cache.latent_shape
    unet, embedder = build_models(cfg.model, channels, size)
    model = Denoiser(unet, embedder)
    acc.print(f"UNet preset {cfg.model.preset}: {count_parameters(unet) / 1e6:.2f}M parameters, label embedder "
              f"{count_parameters(embedder) / 1e3:.1f}k; {len(rows)} training latents {cache.latent_shape}")
    noise_scheduler = make_noise_scheduler(cfg.diffusion)
    optimizer = adamw(model.parameters(), cfg.train)
    lr_scheduler = get_scheduler(cfg.train.lr_schedule, optimizer,
                                 num_warmup_steps=cfg.train.lr_warmup_steps * acc.num_processes,
                                 num_training_steps=cfg.train.max_steps * acc.num_processes)
    ema = EMAModel(model.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=True, power=2 / 3) \
        if cfg.train.ema_decay > 0 else None
    model, optimizer, loader, lr_scheduler = acc.prepare(model, optimizer, loader, lr_scheduler)
    run.register(ema)
    step = run.resume()
    acc.print(f"training from step {step} to {cfg.train.max_steps}")

    info = {
        "image_size": int(cache.info["datasets"][0]["patch_size"]),
        "latent_shape": list(cache.latent_shape),
        "latent_scale": cache.info["latent_scale"],
        "prediction_type": cfg.diffusion.prediction_type,
        "label_mode": cfg.data.label_mode,
        "cond_dropout": cfg.diffusion.cond_dropout,
        "default_guidance": cfg.sample.guidance,
        "default_steps": cfg.sample.steps,
        "default_sampler": cfg.sample.sampler,
        "default_real2gen_guidance": cfg.sample.real2gen_guidance,
        "default_real2gen_strength": cfg.sample.real2gen_strength,
        "default_guidance_interval": [float(v) for v in cfg.sample.guidance_interval],
        "default_guidance_rescale": cfg.sample.guidance_rescale,
        "default_null_guidance": cfg.sample.null_guidance,
        "default_null_guidance_middle": cfg.sample.null_guidance_middle,
        "default_null_guidance_middle_below": cfg.sample.null_guidance_middle_below,
        "label_stats": label_statistics(labels),
        "preset": cfg.model.preset,
        "hashes": {"vae": cache.info["vae_hash"],
                   "datasets": {d["path"]: d["content_hash"] for d in cache.info["datasets"]}},
    }
    alphas_device = noise_scheduler.alphas_cumprod.to(acc.device)
    noise_scheduler.alphas_cumprod = alphas_device
    model.train()
    for latents, y in run.batches(loader, step):
        with acc.accumulate(model):
            b = latents.shape[0]
            drop = torch.rand(b, device=latents.device) < cfg.diffusion.cond_dropout
            if cfg.data.label_jitter > 0:
                y = (y + cfg.data.label_jitter * torch.randn_like(y)).clamp(0, 1)  # NaN stays NaN
            y = torch.where(drop, torch.full_like(y, float("nan")), y)  # (B,), NaN = null
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=latents.device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            target = noise if cfg.diffusion.prediction_type == "epsilon" else \
                noise_scheduler.get_velocity(latents, noise, t)
            pred = model(noisy, t, y)
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
            loss = (per_sample * loss_weights(noise_scheduler, t, cfg.diffusion.min_snr_gamma)).mean()
            acc.backward(loss)
            if acc.sync_gradients and cfg.train.max_grad_norm > 0:
                acc.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            if ema is not None:
                ema.step(model.parameters())
            step += 1
            logs = {"loss": acc.gather(loss.detach()).mean().item(), "lr": lr_scheduler.get_last_lr()[0]}
            run.step_done(step, logs)
            if cfg.preview.every > 0 and step % cfg.preview.every == 0 and run.is_main:
                write_preview(run, acc.unwrap_model(model), ema, noise_scheduler, cache.vae_dir, info, cfg, step)
            if step == cfg.sample.guide_snapshot_step and run.is_main:
                save_guide_snapshot(run, acc.unwrap_model(model), ema, step)
            if step >= cfg.train.max_steps:
                break

    acc.wait_for_everyone()
    if run.is_main:
        export(run, acc.unwrap_model(model), ema, noise_scheduler, cache.vae_dir, info, cfg, step)
    run.finish()
    return run.model_dir


@user_errors
def main(argv=None):
    args = train_arg_parser("Train the label-conditioned latent diffusion UNet.").parse_args(argv)
    cfg = load_stage_config(DiffusionTrainConfig, args)
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    release_processes()


if __name__ == "__main__":
    main()
