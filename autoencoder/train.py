"""Train the histology autoencoder with accelerate.

    accelerate launch -m autoencoder.train --config configs/demo/autoencoder.yaml \
        [--set out=runs/demo/autoencoder] [--set data.datasets=[A,B]] [--resume latest] [--overwrite]

Trains on the train split of one or more patch datasets (labelled or not), on
random crops (the model is fully convolutional), with L1 + (1 - SSIM) + KL and
optionally a patch-GAN and LPIPS. At the end it measures the latent scale
(1 / std of the training latents), stores it in the model config and writes
RUN/model/ with `save_pretrained` (the EMA weights when EMA is on).

`model.init_from=DIR` starts from a trained autoencoder; with `model.decoder_only=true`
its encoder stays frozen, so its latents (and a diffusion model trained on them) stay
valid while the decoder learns, e.g. on whole patches after crop training:

    accelerate launch -m autoencoder.train --config configs/demo/autoencoder.yaml --set out=runs/ae-finish \
        --set model.init_from=runs/demo/autoencoder/model --set model.decoder_only=true \
        --set data.crop=0 --set train.batch_size=4 --set train.lr=2e-4 --set train.max_steps=1500
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import ConcatDataset, DataLoader, RandomSampler, WeightedRandomSampler

from mitosis_ldm.errors import UserError, check_at_least, user_errors
from mitosis_ldm.io import atomic_dir, write_json
from mitosis_ldm.launch import release_processes
from mitosis_ldm.training import TrainConfig, TrainingRun, adamw, load_stage_config, train_arg_parser
from patches.dataset import AugmentConfig, PatchDataset

from .losses import (LossConfig, PatchDiscriminator, adaptive_gan_weight, build_lpips, discriminator_step,
                     generator_gan_loss, ssim)
from .model import build_autoencoder, count_parameters


@dataclass
class DataConfig:
    datasets: list[str] = field(default_factory=list)  # patch dataset folders; the train split of each
    crop: int = 32               # random crop size for training (0 = whole patch)
    balance: bool = True         # draw each dataset equally often (a small real set next to a large synthetic one)
    dihedral: bool = True        # random flips / 90-degree rotations
    stain_jitter: float = 0.0
    eval_split: str = "val"      # held-out split measured every `eval_every` steps
    eval_limit: int = 256        # patches per dataset in that measurement
    eval_every: int = 0          # 0 = only at the end
    scale_patches: int = 1024    # training patches encoded to measure the latent scale


@dataclass
class ModelConfig:
    preset: str = "tiny"         # tiny (CPU demo) | base (GPU)
    latent_channels: int = 4
    init_from: str = ""          # a trained autoencoder folder to start from (its own architecture, not the preset)
    decoder_only: bool = False   # with init_from: the encoder stays frozen, only the decoder learns


@dataclass
class AutoencoderConfig:
    out: str = "runs/autoencoder"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=2000, batch_size=32, lr=2e-3,
                                                                   adam_betas=(0.9, 0.99)))


def training_set(cfg: DataConfig) -> ConcatDataset:
    if not cfg.datasets:
        raise UserError("data.datasets: empty; give one or more patch dataset folders, "
                        "e.g. --set data.datasets=[runs/demo/data/synth]")
    augment = AugmentConfig(dihedral=cfg.dihedral, crop=cfg.crop, stain_jitter=cfg.stain_jitter)
    parts = [PatchDataset(root, split="train", augment=augment) for root in cfg.datasets]
    sizes = {min(p.patch_size, cfg.crop) if cfg.crop else p.patch_size for p in parts}
    if len(sizes) > 1:
        raise UserError(f"data.datasets: patch sizes differ ({sorted(sizes)}); set data.crop to a common size")
    for root, part in zip(cfg.datasets, parts):
        if len(part) == 0:
            raise UserError(f"{root}: has no patches in the train split")
    return ConcatDataset(parts)


def sampler(dataset: ConcatDataset, cfg: DataConfig):
    """Uniform shuffling, or (balance) each dataset drawn with equal probability, one epoch = len(dataset) draws."""
    if not cfg.balance or len(dataset.datasets) == 1:
        return RandomSampler(dataset)
    weights = torch.cat([torch.full((len(part),), 1.0 / len(part)) for part in dataset.datasets])
    return WeightedRandomSampler(weights, num_samples=len(dataset), replacement=True)


def held_out_images(cfg: DataConfig, split: str, limit: int) -> dict[str, torch.Tensor]:
    """Whole held-out patches per dataset, (N, 3, P, P) in [-1, 1]; datasets without the split are skipped."""
    out = {}
    for root in cfg.datasets:
        ds = PatchDataset(root, split=split)
        if len(ds):
            images = ds.uint8(np.arange(min(limit, len(ds))))
            out[str(root).rstrip("/").split("/")[-1]] = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return out


class SampledAutoencoder(torch.nn.Module):
    """One forward for training (so DDP sees it): encode, sample the posterior, decode; return its KL too."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        recon = self.vae.decode(posterior.sample()).sample  # (B, 3, H, W)
        return recon, posterior.kl()  # kl: (B,) summed over latent elements


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Deterministic reconstruction (posterior mode) of images in [-1, 1]."""
    outs = []
    for chunk in images.split(batch):
        z = vae.encode(chunk).latent_dist.mode()
        outs.append(vae.decode(z).sample.clamp(-1, 1))
    return torch.cat(outs)


def psnr_ssim(vae: AutoencoderKL, images: torch.Tensor) -> tuple[float, float]:
    """Mean per-image PSNR (dB, 8-bit quantised output) and SSIM over images in [-1, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    recon = reconstruct(vae, images)
    quant = ((recon + 1) * 127.5).round() / 255.0
    target = (images + 1) / 2
    psnr = peak_signal_noise_ratio(quant, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim_value = structural_similarity_index_measure(quant, target, data_range=1.0)
    return float(psnr.mean()), float(ssim_value)


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> float:
    """1 / std of the training latents (posterior means), so scaled latents have unit variance."""
    latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in images.split(batch)])
    return float(1.0 / latents.float().std().clamp_min(1e-8))


def training_patches(cfg: DataConfig, limit: int) -> torch.Tensor:
    per = max(1, limit // len(cfg.datasets))
    chunks = []
    for root in cfg.datasets:
        ds = PatchDataset(root, split="train")
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(len(ds), size=min(per, len(ds)), replace=False))
        chunks.append(torch.from_numpy(ds.uint8(pick)).permute(0, 3, 1, 2).float() / 127.5 - 1)
    return torch.cat(chunks)


@contextlib.contextmanager
def ema_weights(model, ema: EMAModel | None):
    """Temporarily swap the EMA weights into `model` (what gets evaluated and exported)."""
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())


def evaluate(run: TrainingRun, vae, ema, held_out: dict[str, torch.Tensor]) -> dict[str, float]:
    logs = {}
    vae.eval()
    with ema_weights(vae, ema):
        for name, images in held_out.items():
            psnr, ssim_value = psnr_ssim(vae, images.to(run.device))
            logs[f"psnr/{name}"], logs[f"ssim/{name}"] = psnr, ssim_value
    vae.train()
    return logs


def export(run: TrainingRun, cfg: AutoencoderConfig, vae: AutoencoderKL, ema: EMAModel | None, extra: dict) -> None:
    """Write RUN/model: the (EMA) weights with the latent scale in config.json, measured on this run's training
    patches; a decoder-only run keeps its starting model's scale, since its latents (and any diffusion model
    trained on them) are unchanged whatever data finished the decoder."""
    final = copy.deepcopy(vae).to("cpu").eval()
    if ema is not None:
        ema.copy_to(final.parameters())
    if cfg.model.decoder_only:
        scale, how = float(final.config.scaling_factor), "kept from model.init_from"
    else:
        scale, how = latent_scale(final, training_patches(cfg.data, cfg.data.scale_patches)), "measured"
        final.register_to_config(scaling_factor=scale)
    with atomic_dir(run.model_dir, overwrite=True) as tmp:
        final.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "training.json", {"latent_scale": scale,
                                           "preset": None if cfg.model.init_from else cfg.model.preset,
                                           "datasets": cfg.data.datasets, **extra})
    run.accelerator.print(f"latent scale 1/std = {scale:.4f} ({how}); model written to {run.model_dir}")


def starting_model(cfg: ModelConfig) -> AutoencoderKL | None:
    """The `init_from` autoencoder, its encoder side frozen with `decoder_only`; None for a fresh preset (built
    after the run has seeded the generators)."""
    if cfg.decoder_only and not cfg.init_from:
        raise UserError("model.decoder_only: needs model.init_from, the trained autoencoder whose encoder stays frozen")
    if not cfg.init_from:
        return None
    from diffusion.cache import load_vae

    _, vae = load_vae(cfg.init_from, "model.init_from")
    vae.train()
    if cfg.decoder_only:
        for part in (vae.encoder, vae.quant_conv):
            part.requires_grad_(False)
    return vae


def check_config(cfg: AutoencoderConfig) -> None:
    """One line naming the key for a data, model or loss value the stage cannot train with (the `train:` section
    has its own check, `mitosis_ldm.training.check_train_config`)."""
    import math

    from .model import PRESETS

    if not 0 <= cfg.data.stain_jitter < float("inf"):
        raise UserError(f"data.stain_jitter: must be a finite number >= 0 (0: off), got {cfg.data.stain_jitter}")
    if cfg.data.crop < 0 or cfg.data.crop % 4:
        raise UserError(f"data.crop: must be 0 (whole patches) or a positive multiple of 4 (the autoencoder "
                        f"downsamples by 4), got {cfg.data.crop}")
    for key in ("scale_patches", "eval_limit"):
        check_at_least(getattr(cfg.data, key), f"data.{key}")
    if cfg.data.eval_every < 0:
        raise UserError(f"data.eval_every: must be >= 0 (0: only at the end), got {cfg.data.eval_every}")
    if not cfg.model.init_from and cfg.model.preset not in PRESETS:
        raise UserError(f"model.preset: unknown autoencoder preset '{cfg.model.preset}' (known: {', '.join(PRESETS)})")
    check_at_least(cfg.model.latent_channels, "model.latent_channels")
    for key in ("l1", "ssim", "kl", "lpips", "gan", "disc_lr"):
        value = getattr(cfg.loss, key)
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"loss.{key}: must be a finite weight >= 0, got {value}")
    if cfg.loss.gan_start < 0:
        raise UserError(f"loss.gan_start: must be >= 0 (the step the discriminator joins), got {cfg.loss.gan_start}")
    if cfg.loss.disc_layers < 0:
        raise UserError(f"loss.disc_layers: must be >= 0, got {cfg.loss.disc_layers}")
    if cfg.loss.disc_channels < 4 or cfg.loss.disc_channels % 4:
        raise UserError(f"loss.disc_channels: must be a positive multiple of 4 (its group norms have 8 groups), "
                        f"got {cfg.loss.disc_channels}")


@user_errors
def main(argv=None):
    args = train_arg_parser("Train the histology autoencoder (AutoencoderKL) with accelerate.").parse_args(argv)
    cfg = load_stage_config(AutoencoderConfig, args)
    check_config(cfg)
    dataset = training_set(cfg.data)  # validate inputs before creating the run folder
    if len(dataset) < cfg.train.batch_size:
        raise UserError(f"train.batch_size: {cfg.train.batch_size} is larger than the {len(dataset)} training patches")
    if cfg.loss.gan > 0:
        side = dataset[0]["image"].shape[-1]
        if PatchDiscriminator(cfg.loss.disc_channels, cfg.loss.disc_layers).output_size(side) < 1:
            raise UserError(f"loss.disc_layers: {cfg.loss.disc_layers} layers leave no logits for the {side}-pixel "
                            f"training images; use fewer layers or a larger data.crop")
    lpips = build_lpips(cfg.loss.lpips_net) if cfg.loss.lpips > 0 else None
    raw = starting_model(cfg.model)  # checked before the run folder exists
    run = TrainingRun(cfg.out, cfg.train, cfg, resume=args.resume, overwrite=args.overwrite)
    acc = run.accelerator

    if raw is None:
        raw = build_autoencoder(cfg.model.preset, cfg.model.latent_channels)
    vae = SampledAutoencoder(raw)
    trainable = [p for p in raw.parameters() if p.requires_grad]
    origin = ('from ' + cfg.model.init_from) if cfg.model.init_from else 'preset ' + cfg.model.preset
    acc.print(f"autoencoder {origin}: "
              f"{count_parameters(raw) / 1e6:.2f}M parameters ({sum(p.numel() for p in trainable) / 1e6:.2f}M "
              f"trained), {raw.config.latent_channels} latent channels; {len(dataset)} training patches")
    opt = adamw(trainable, cfg.train)
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    sched = get_scheduler(cfg.train.lr_schedule, opt, num_warmup_steps=cfg.train.lr_warmup_steps,
                          num_training_steps=cfg.train.max_steps)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler(dataset, cfg.data), drop_last=True,
                        num_workers=cfg.train.num_workers, persistent_workers=cfg.train.num_workers > 0)
    disc = disc_opt = None
    if cfg.loss.gan > 0:
        disc = PatchDiscriminator(cfg.loss.disc_channels, cfg.loss.disc_layers)
        disc_opt = adamw(disc.parameters(), cfg.train, lr=cfg.loss.disc_lr, betas=(0.5, 0.9), weight_decay=0.01)
        vae, opt, loader, disc, disc_opt = acc.prepare(vae, opt, loader, disc, disc_opt)
    else:
        vae, opt, loader = acc.prepare(vae, opt, loader)
    if lpips is not None:
        lpips.to(run.device)
    ema = EMAModel(raw.parameters(), decay=cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    run.register(sched, ema)  # puts the average on the run's device
    step = run.resume()
    acc.print(f"start at step {step} of {cfg.train.max_steps}")
    held_out = held_out_images(cfg.data, cfg.data.eval_split, cfg.data.eval_limit) if run.is_main else {}
    eval_seconds = 0.0

    vae.train()
    for batch in run.batches(loader, step):
        images = batch["image"]  # (B, 3, c, c) in [-1, 1]
        with acc.accumulate(vae):
            recon, kl = vae(images)  # (B, 3, c, c), (B,)
            l1 = (recon - images).abs().mean()
            rec_loss = cfg.loss.l1 * l1
            ssim_value = ssim(recon, images)
            rec_loss = rec_loss + cfg.loss.ssim * (1 - ssim_value)
            if lpips is not None:
                rec_loss = rec_loss + cfg.loss.lpips * lpips.net(recon.clamp(-1, 1), images).mean()
            kl_loss = kl.mean() / images[0].numel()
            loss = rec_loss + cfg.loss.kl * kl_loss
            logs = {"l1": l1.item(), "ssim": ssim_value.item(), "kl": kl_loss.item()}
            gan_on = disc is not None and step >= cfg.loss.gan_start
            if gan_on:
                g_loss = generator_gan_loss(acc.unwrap_model(disc), recon)  # outside DDP: D gets no gradient here
                weight = adaptive_gan_weight(rec_loss, g_loss, raw.decoder.conv_out.weight) * cfg.loss.gan
                loss = loss + weight * g_loss
                logs.update(g_loss=g_loss.item(), gan_weight=weight.item())
            acc.backward(loss)
            if acc.sync_gradients and cfg.train.max_grad_norm > 0:
                acc.clip_grad_norm_(vae.parameters(), cfg.train.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if gan_on:
                logs["d_loss"] = discriminator_step(disc, disc_opt, images, recon, acc.backward)
        if acc.sync_gradients:
            sched.step()
            if ema is not None:
                ema.step(raw.parameters())
            step += 1
            logs["loss"] = loss.item()
            logs["lr"] = sched.get_last_lr()[0]
            if run.is_main and cfg.data.eval_every and step % cfg.data.eval_every == 0 and step < cfg.train.max_steps:
                t0 = time.time()
                logs.update(evaluate(run, raw, ema, held_out))
                eval_seconds += time.time() - t0
                logs["train_time_s"] = run.elapsed() - eval_seconds
                run.log(step, logs)
                logs = {}  # already logged with the evaluation
            run.step_done(step, logs)
            if step >= cfg.train.max_steps:
                break

    acc.wait_for_everyone()
    if run.is_main:
        final_logs = evaluate(run, raw, ema, held_out)
        final_logs["train_time_s"] = run.elapsed() - eval_seconds
        run.log(step, final_logs)
        acc.print("held-out " + ", ".join(f"{k} {v:.4g}" for k, v in final_logs.items()))
        export(run, cfg, raw, ema, {"steps": step, "held_out": final_logs, "parameters": count_parameters(raw),
                                    "init_from": cfg.model.init_from or None,
                                    "decoder_only": cfg.model.decoder_only})
    run.finish()
    release_processes()


if __name__ == "__main__":
    main()
