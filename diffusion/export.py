"""What a diffusion training run writes besides its checkpoints: preview strips, the autoguidance snapshot and the
exported pipeline folder, each from an EMA copy of the model so the training weights stay untouched.

Used by `diffusion.train`; not a command of its own.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from mitosis_ldm.errors import UserError
from mitosis_ldm.images import contact_sheet, save_png

from .model import Denoiser


def build_pipeline(unet, embedder, noise_scheduler, vae_dir: Path, info: dict, guide=None):
    from diffusers import AutoencoderKL

    from .pipeline import MitosisPipeline

    return MitosisPipeline(AutoencoderKL.from_pretrained(vae_dir), unet, embedder, noise_scheduler, info, guide=guide)


def ema_copy(model: Denoiser, ema: EMAModel | None) -> Denoiser:
    """A CPU copy of the model carrying the EMA weights (the training weights stay untouched)."""
    copy_ = copy.deepcopy(model).cpu().float().eval()
    if ema is not None:
        ema.copy_to(copy_.parameters())
    return copy_


def preview_conditions(cfg) -> list[float]:
    return np.linspace(0, 1, cfg.preview.conditions).round(3).tolist()


def preview_sheet(frames: np.ndarray, conditions: list[float]) -> np.ndarray:
    """(seeds, conditions, H, W, 3) frames -> one captioned sheet, a row per seed."""
    return contact_sheet(frames.reshape(-1, *frames.shape[2:]), [f"y={c:.2f}" for c in conditions] * len(frames),
                         ncols=len(conditions), scale=2)


def write_preview(run, model, ema, noise_scheduler, vae_dir, info, cfg, step) -> None:
    """The preview strips, sampled as the exported pipeline will sample: the stored guidance schedule and null-label
    term, against the weak guide once its snapshot is kept (classifier-free before that step)."""
    net = ema_copy(model, ema)
    weak = cfg.sample.guide == "weak" and 0 < cfg.sample.guide_snapshot_step < step
    pipe = build_pipeline(net.unet, net.embedder, _cpu_scheduler(noise_scheduler), vae_dir, info,
                          guide=load_guide_snapshot(run, cfg) if weak else None)
    pipe.to(run.device)  # sampled where the run trains: on a GPU, a CPU preview would leave it idle for minutes
    guide = "weak" if weak else "null"
    conditions = preview_conditions(cfg)
    frames = pipe.transitions(cfg.preview.seeds, conditions, cfg.sample.guidance, cfg.sample.steps, cfg.sample.sampler,
                              guidance_interval=cfg.sample.guidance_interval,
                              guidance_rescale=cfg.sample.guidance_rescale, guide=guide,
                              null_guidance=cfg.sample.null_guidance,
                              null_guidance_middle=cfg.sample.null_guidance_middle,
                              null_guidance_middle_below=cfg.sample.null_guidance_middle_below)
    save_png(run.run_dir / "previews" / f"step-{step:06d}.png", preview_sheet(frames, conditions))
    net.train()


def _cpu_scheduler(noise_scheduler: DDPMScheduler) -> DDPMScheduler:
    return DDPMScheduler.from_config(noise_scheduler.config)


def save_guide_snapshot(run, model, ema, step) -> None:
    """The EMA weights now, kept in the run folder until export puts them in the pipeline's guide/."""
    from mitosis_ldm.io import atomic_dir

    net = ema_copy(model, ema)
    with atomic_dir(run.run_dir / "guide", overwrite=True) as tmp:
        net.unet.save_pretrained(tmp / "unet")
        net.embedder.save_pretrained(tmp / "label_embedder")
    run.accelerator.print(f"kept the step-{step} EMA weights as the autoguidance guide ({run.run_dir / 'guide'})")


def load_guide_snapshot(run, cfg):
    """(unet, label_embedder) of the snapshot, None when training keeps none."""
    if cfg.sample.guide_snapshot_step == 0:
        return None
    from diffusers import UNet2DModel

    from .model import LabelEmbedder

    folder = run.run_dir / "guide"
    if not (folder / "unet" / "config.json").exists():
        raise UserError(f"{folder}: the step-{cfg.sample.guide_snapshot_step} guide snapshot is missing; "
                        f"train again without --resume")
    return UNet2DModel.from_pretrained(folder / "unet"), LabelEmbedder.from_pretrained(folder / "label_embedder")


def export(run, model, ema, noise_scheduler, vae_dir, info, cfg, step) -> None:
    from mitosis_ldm.io import atomic_dir

    net = ema_copy(model, ema)
    info = {**info, "trained_steps": step, "ema": ema is not None}
    guide = load_guide_snapshot(run, cfg)
    if guide is not None:
        info.update({"default_guide": cfg.sample.guide, "guide": {
            "snapshot_step": cfg.sample.guide_snapshot_step, "cond_dropout": cfg.diffusion.cond_dropout}})
    pipe = build_pipeline(net.unet, net.embedder, _cpu_scheduler(noise_scheduler), vae_dir, info, guide=guide)
    with atomic_dir(run.model_dir, overwrite=True) as tmp:
        pipe.save_pretrained(tmp)
    run.accelerator.print(f"exported the pipeline (EMA weights) to {run.model_dir}")
