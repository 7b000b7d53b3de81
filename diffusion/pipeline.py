"""The diffusion pipeline folder and the sampling it does: guided transitions and samples (SDEdit and DDIM
inversion: diffusion/inversion.py).

    pipe = MitosisPipeline.from_pretrained("runs/demo/diffusion/model")
    frames = pipe.transitions(seeds=[0, 1], conditions=[0, 0.5, 1], guidance=3, steps=20, sampler="dpm++")

Folder layout (`RUN/model/`): `pipeline.json` {"format": "mitosis-ldm/pipeline",
latent shape, prediction type, default guidance/steps/sampler, the training
data's label statistics, hashes}, and the diffusers folders `vae/`, `unet/`,
`label_embedder/`, `scheduler/` (safetensors + JSON).

Classifier-free guidance: every UNet call carries the conditional and the
unconditional (null label) halves in one batch; the prediction is
`uncond + guidance * (cond - uncond)`. Every condition of a seed starts from
the same initial noise and, for stochastic samplers, draws the same step noise.

The guidance schedule (pipeline.json `default_guidance_interval`,
`default_guidance_rescale`; keyword arguments of `transitions`):
- `guidance_interval` (low, high): guide only at noise levels t / (T - 1) in
  [low, high]; elsewhere the plain conditional prediction (guidance 1) is used
  (Kynkäänniemi et al. 2024). (0, 1) guides every step.
- `guidance_rescale` phi in [0, 1]: rescale the guided prediction toward the
  conditional prediction's std, mixing by phi (Lin et al. 2024, sec. 3.4).

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version
of itself"): a pipeline folder may hold a weaker conditional model in `guide/`
(`unet/`, `label_embedder/`; `mitosis-ldm guide` attaches one, or training's
`sample.guide_snapshot_step` keeps an early EMA snapshot of the same run). With
`guide="weak"` the prediction is `weak + guidance * (cond - weak)`, both under
the same label: it sharpens what the label asks for without pushing every
condition away from the unconditional (label-mixed) mean, which is what makes
classifier-free guidance switch in the uncertain middle. pipeline.json
`default_guide` ("null" or "weak") is what `transitions` and `generate` use;
real2gen, the explorer and DDIM inversion always guide against the null label.

A null-label term (`null_guidance` n, pipeline.json `default_null_guidance`)
adds `n * (cond - uncond)` to either guide's prediction, inside the same
interval: with the weak guide it keeps autoguidance's gradual label response
and adds classifier-free guidance's push away from the unlabelled (null) mean,
which is where the unlabelled slide nuclei's look lives. It costs the null
half's UNet rows on top of the weak model's call.
`null_guidance_middle` M (pipeline.json `default_null_guidance_middle`) eases the
term with the label, `n * (1 - (1 - M) sin²(pi y))`: whole at y = 0 and 1, M x n
at y = 0.5 (`null_term_scale`). `null_guidance_middle_below` L (pipeline.json
`default_null_guidance_middle_below`, 1 = every level) eases it only at noise levels
t/T <= L: above, where a frame's layout is decided, the term stays whole at every label.

Devices: `pipe.to("cuda")` moves every model; `transitions` and `samples` then
run there. Initial and step noise are still drawn from CPU generators, so a
seed starts from the same noise on every device.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DModel

from mitosis_ldm.artifacts import FORMAT, PIPELINE, expect_artifact, held_library_logs
from mitosis_ldm.errors import UserError
from mitosis_ldm.hashing import hash_folder
from mitosis_ldm.io import write_json

from .cache import decode_latents, encode_images
from .inversion import RealToGenerated
from .model import LabelEmbedder, time_embed_dim
from .sampling_args import (GUIDES, check_conditions, check_guidance_schedule, check_null_guidance,
                            check_null_guidance_middle, check_null_guidance_middle_below, check_sampling_args)
from .schedulers import sampler_scheduler


class MitosisPipeline(RealToGenerated):
    """VAE + label-conditioned UNet + label embedder + noise schedule, loaded in one call."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DModel, label_embedder: LabelEmbedder, scheduler, info: dict,
                 path: Path | None = None, guide: tuple[UNet2DModel, LabelEmbedder] | None = None):
        self.vae = vae.eval()
        self.unet = unet.eval()
        self.label_embedder = label_embedder.eval()
        self.guide = None if guide is None else (guide[0].eval(), guide[1].eval())  # autoguidance's weak model
        self.scheduler = scheduler
        self.info = info
        self.path = path
        self._hash = None

    # -- folder in / out ---------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, flag: str = "--pipeline") -> "MitosisPipeline":
        from .pipeline_folder import load_parts  # imports this module

        path = expect_artifact(path, PIPELINE, flag)  # marker + recorded hashes
        with held_library_logs():  # what diffusers says of one part shows only if the whole folder loads
            vae, unet, embedder, scheduler, info, guide = load_parts(path)  # each part loads, pipeline.json agrees
            check_compatible(vae, unet, embedder, info, path)
        return cls(vae, unet, embedder, scheduler, info, path, guide)

    def save_pretrained(self, path) -> None:
        """Write the folder's parts into `path` (callers wrap this in atomic_dir)."""
        path = Path(path)
        self.vae.save_pretrained(path / "vae")
        self.unet.save_pretrained(path / "unet")
        self.label_embedder.save_pretrained(path / "label_embedder")
        self.scheduler.save_pretrained(path / "scheduler")
        if self.guide is not None:
            self.guide[0].save_pretrained(path / "guide" / "unet")
            self.guide[1].save_pretrained(path / "guide" / "label_embedder")
        write_json(path / "pipeline.json", {"format": FORMAT[PIPELINE], **self.info})

    def to(self, device) -> "MitosisPipeline":
        """Move every model (the weak guide too) to `device`; transitions and samples run there."""
        for module in (self.vae, self.unet, self.label_embedder, *(self.guide or ())):
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            self._hash = hash_folder(self.path) if self.path else "unsaved"
        return self._hash

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def default_guidance(self) -> float:
        return float(self.info.get("default_guidance", 3.0))

    @property
    def default_guidance_interval(self) -> tuple[float, float]:
        low, high = self.info.get("default_guidance_interval", (0.0, 1.0))
        return float(low), float(high)

    @property
    def default_guidance_rescale(self) -> float:
        return float(self.info.get("default_guidance_rescale", 0.0))

    @property
    def default_null_guidance(self) -> float:
        return float(self.info.get("default_null_guidance", 0.0))

    @property
    def default_null_guidance_middle(self) -> float:
        return float(self.info.get("default_null_guidance_middle", 1.0))

    @property
    def default_null_guidance_middle_below(self) -> float:
        return float(self.info.get("default_null_guidance_middle_below", 1.0))

    @property
    def default_guide(self) -> str:
        return str(self.info.get("default_guide", "null"))

    def check_guide(self, guide: str | None, flag: str = "--guide") -> str:
        """`guide` (None: the pipeline's default) checked against what this folder holds."""
        guide = self.default_guide if guide is None else guide
        if guide not in GUIDES:
            raise UserError(f"{flag}: must be one of {', '.join(GUIDES)}, got '{guide}'")
        if guide == "weak" and self.guide is None:
            raise UserError(f"{flag}: 'weak' needs a guide model, and {self.path or 'this pipeline'} has no guide/ "
                            f"(attach one with mitosis-ldm guide)")
        return guide

    # -- pieces ---------------------------------------------------------------
    def encode(self, images_uint8: np.ndarray) -> torch.Tensor:
        return encode_images(self.vae, images_uint8, "mean")

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return decode_latents(self.vae, latents.to(self.device))

    @torch.no_grad()
    def guided(self, latents: torch.Tensor, t, labels: torch.Tensor, guidance: float,
               guidance_rescale: float = 0.0, guide: str = "null", null_guidance: float = 0.0,
               null_guidance_middle: float = 1.0) -> torch.Tensor:
        """Conditional and null halves in one batched UNet call -> guided prediction (B, C, h, w).

        When one half alone decides the result (all labels null, guidance 0 without rescaling, or guidance 1
        without a null term: the conditional prediction, which rescaling toward its own std leaves as it is),
        only that half is computed: half the work, e.g. for inverting a real nucleus that has no label, or for
        the steps outside the guidance interval.
        `guide="weak"`: autoguidance, the weak model's conditional prediction (its own UNet call) in place of
        the null half. `null_guidance` n > 0 adds `n * (cond - uncond)` to either, scaled per row by the
        label profile `null_term_scale` (`null_guidance_middle`: the share of n kept at y = 0.5).
        """
        b = latents.shape[0]
        device = latents.device
        labels = labels.to(device)
        timesteps = torch.full((b,), int(t), dtype=torch.long, device=device)
        null = torch.isnan(labels)
        if bool(null.all()) or (guidance == 0 and guidance_rescale == 0 and guide == "null" and null_guidance == 0):
            nan = torch.full((b,), float("nan"), device=device)
            return self.unet(latents, timesteps, class_labels=self.label_embedder(nan)).sample
        if guidance == 1 and null_guidance == 0 and not bool(null.any()):
            return self.unet(latents, timesteps, class_labels=self.label_embedder(labels.float())).sample
        if guide == "weak":
            weak_unet, weak_embedder = self.guide
            if null_guidance > 0:
                cond, uncond = self._cond_and_null(latents, timesteps, labels)
            else:
                cond = self.unet(latents, timesteps, class_labels=self.label_embedder(labels.float())).sample
            weak = weak_unet(latents, timesteps, class_labels=weak_embedder(labels.float())).sample
            guided = weak + guidance * (cond - weak)
            if null_guidance > 0:
                guided = guided + null_term_scale(labels, null_guidance, null_guidance_middle) * (cond - uncond)
            guided = self._rescaled(guided, cond, guidance_rescale)
            # a null label asks for nothing to sharpen: the strong model's unconditional prediction
            return torch.where(null[:, None, None, None], cond, guided)
        cond, uncond = self._cond_and_null(latents, timesteps, labels)
        # a null label guides nothing: its conditional half *is* the unconditional prediction
        push = guidance + null_term_scale(labels, null_guidance, null_guidance_middle)
        guided = self._rescaled(uncond + push * (cond - uncond), cond, guidance_rescale)
        return torch.where(null[:, None, None, None], uncond, guided)

    def _cond_and_null(self, latents: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor):
        """The conditional and the null-label predictions, in one batched UNet call."""
        b = latents.shape[0]
        # the null half depends on the latent alone: rows that share a latent (a transition's conditions at its
        # first step share one noise) share one unconditional prediction
        unique, inverse = torch.unique(latents.reshape(b, -1), dim=0, return_inverse=True)
        null_rows = unique.reshape(-1, *latents.shape[1:]) if len(unique) < b else latents
        u = len(null_rows)
        all_labels = torch.cat([labels.float(), torch.full((u,), float("nan"), device=latents.device)])  # (B + U,)
        emb = self.label_embedder(all_labels)  # (B + U, D)
        out = self.unet(torch.cat([latents, null_rows]), timesteps[:1].expand(b + u), class_labels=emb).sample
        cond, uncond = out[:b], out[b:]
        if u < b:
            uncond = uncond[inverse]
        return cond, uncond

    @staticmethod
    def _rescaled(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
        if guidance_rescale > 0:
            from diffusers.guiders.guider_utils import rescale_noise_cfg

            guided = rescale_noise_cfg(guided, cond, guidance_rescale)  # per-sample std back toward cond's
        return guided

    def in_interval(self, t, interval: tuple[float, float]) -> bool:
        """Whether timestep t's noise level is inside the guidance interval (outside: the conditional prediction)."""
        return interval[0] <= self.noise_level(t) <= interval[1]

    def noise_level(self, t) -> float:
        """Timestep t as a noise level t/T in [0, 1] (T - 1, the last training timestep, is 1)."""
        return int(t) / max(1, self.scheduler.config.num_train_timesteps - 1)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, labels: torch.Tensor, guidance: float, scheduler, timesteps,
                generators=None, guidance_interval: tuple[float, float] = (0.0, 1.0),
                guidance_rescale: float = 0.0, guide: str = "null", null_guidance: float = 0.0,
                null_guidance_middle: float = 1.0, null_guidance_middle_below: float = 1.0) -> torch.Tensor:
        for t in timesteps:
            model_in = scheduler.scale_model_input(latents, t)
            inside = self.in_interval(t, guidance_interval)
            # the middle share only at noise levels up to `null_guidance_middle_below`: the whole term above
            middle = null_guidance_middle if self.noise_level(t) <= null_guidance_middle_below else 1.0
            pred = self.guided(model_in, t, labels, guidance if inside else 1.0, guidance_rescale, guide,
                               null_guidance if inside else 0.0, middle)
            extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
            latents = scheduler.step(pred, t, latents, **extra).prev_sample
        return latents

    # -- what users ask for ------------------------------------------------
    @torch.no_grad()
    def transitions(self, seeds, conditions, guidance: float | None = None, steps: int = 20,
                    sampler: str = "dpm++", seeds_per_batch: int = 4, latents_only: bool = False, *,
                    guidance_interval: tuple[float, float] | None = None, guidance_rescale: float | None = None,
                    guide: str | None = None, null_guidance: float | None = None,
                    null_guidance_middle: float | None = None, null_guidance_middle_below: float | None = None):
        """The same nucleus at every condition: uint8 (S, C, H, W, 3).

        `guidance`, `guidance_interval`, `guidance_rescale`, `guide` ("null": classifier-free, "weak":
        autoguidance), `null_guidance`, `null_guidance_middle` and `null_guidance_middle_below` default to the
        pipeline's (pipeline.json). A repeated condition renders its frame again from the same noise (a check of
        that sharing); the command line refuses repeats, since its means would count them twice.
        """
        conditions = check_conditions(conditions)
        guidance, schedule = self.schedule(
            guidance, steps, guidance_interval=guidance_interval, guidance_rescale=guidance_rescale, guide=guide,
            null_guidance=null_guidance, null_guidance_middle=null_guidance_middle,
            null_guidance_middle_below=null_guidance_middle_below)
        k = len(conditions)
        frames = []
        for start in range(0, len(seeds), max(1, seeds_per_batch)):
            chunk = list(seeds)[start: start + seeds_per_batch]
            # one noise per seed, shared by its conditions
            latents = self._sample_rows([s for s in chunk for _ in range(k)], conditions * len(chunk), guidance, steps,
                                        sampler, schedule)
            frames.append(latents if latents_only else self.decode(latents).reshape(len(chunk), k, *self.image_shape))
        if latents_only:
            return torch.cat(frames)
        return np.concatenate(frames)

    @torch.no_grad()
    def samples(self, seeds, labels, guidance: float | None = None, steps: int = 20, sampler: str = "dpm++",
                batch_size: int = 64, **schedule) -> np.ndarray:
        """One patch per (seed, label) pair, uint8 (N, H, W, 3), mixed labels in one UNet batch.

        Patch i is what `transitions(seeds=[seeds[i]], conditions=[labels[i]])` renders (the same noise), up to
        the last bit of batched arithmetic. `schedule`: the keyword overrides `transitions` takes
        (`guidance_interval`, `guidance_rescale`, `guide`, `null_guidance`, `null_guidance_middle`,
        `null_guidance_middle_below`); each defaults to the pipeline's.
        """
        labels = check_conditions(labels, "labels")
        if len(seeds) != len(labels):
            raise ValueError(f"{len(seeds)} seeds but {len(labels)} labels")
        guidance, schedule = self.schedule(guidance, steps, **schedule)
        step = max(1, batch_size)
        out = [self.decode(self._sample_rows(seeds[i: i + step], labels[i: i + step], guidance, steps, sampler,
                                             schedule))
               for i in range(0, len(seeds), step)]
        return np.concatenate(out)

    def schedule(self, guidance: float | None, steps: int, *, guidance_interval=None, guidance_rescale=None,
                 guide: str | None = None, null_guidance: float | None = None, null_guidance_middle=None,
                 null_guidance_middle_below=None) -> tuple[float, dict]:
        """(guidance, schedule): each given value checked, each None the pipeline's default (pipeline.json).

        `schedule` holds `guidance_interval` (a list [low, high]), `guidance_rescale`, `guide`, `null_guidance`,
        `null_guidance_middle` and `null_guidance_middle_below`: JSON-ready, so manifests record it as it is, and
        the keyword arguments that `transitions` / `samples` take.
        """
        guidance = self.default_guidance if guidance is None else float(guidance)
        check_sampling_args(guidance, steps)
        null_guidance = check_null_guidance(self.default_null_guidance if null_guidance is None else null_guidance)
        middle = check_null_guidance_middle(
            self.default_null_guidance_middle if null_guidance_middle is None else null_guidance_middle)
        below = check_null_guidance_middle_below(
            self.default_null_guidance_middle_below if null_guidance_middle_below is None
            else null_guidance_middle_below)
        interval, rescale = check_guidance_schedule(
            self.default_guidance_interval if guidance_interval is None else guidance_interval,
            self.default_guidance_rescale if guidance_rescale is None else guidance_rescale)
        return guidance, {"guidance_interval": list(interval), "guidance_rescale": rescale,
                          "guide": self.check_guide(guide), "null_guidance": null_guidance,
                          "null_guidance_middle": middle, "null_guidance_middle_below": below}

    def _sample_rows(self, row_seeds, row_labels, guidance, steps, sampler, schedule: dict) -> torch.Tensor:
        """Latents of one batch: row i starts from seed i's noise and is denoised under label i (on the
        pipeline's device; the noise comes from CPU generators, the same on every device). `schedule`: as
        `schedule` resolves it."""
        shape = self.latent_shape
        scheduler = sampler_scheduler(self.scheduler.config, sampler)
        scheduler.set_timesteps(steps)
        noise = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s)))
                           for s in row_seeds])
        # stochastic samplers: one step-noise stream per row, the same for every row of one seed
        generators = [torch.Generator().manual_seed(int(s) + 1_000_003) for s in row_seeds]
        labels = torch.tensor(list(row_labels), dtype=torch.float32, device=self.device)
        return self.denoise(noise.to(self.device) * scheduler.init_noise_sigma, labels, guidance, scheduler,
                            scheduler.timesteps, generators, **schedule)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = int(self.info.get("image_size", self.unet.config.sample_size * vae_factor(self.vae)))
        return (size, size, 3)


def null_term_scale(labels: torch.Tensor, null_guidance: float, middle: float = 1.0):
    """The null-label term's scale per row: n at y = 0 and y = 1, `middle` x n at y = 0.5, following
    n * (1 - (1 - middle) * sin²(pi y)) in between (flat when middle is 1). (B, 1, 1, 1), or the float n.

    The term pushes each frame away from the unlabelled mean. At the ends of the label range that keeps frames
    in the data; in the middle, where real figures with one soft label are a mixture of looks, it sorts them to
    one side and sharpens the label response.
    """
    if middle == 1.0:
        return null_guidance
    y = torch.nan_to_num(labels.float(), nan=0.0)  # null rows: unused (they take the unguided prediction)
    scale = null_guidance * (1.0 - (1.0 - middle) * torch.sin(math.pi * y) ** 2)
    return scale[:, None, None, None]


def vae_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_compatible(vae, unet, embedder, info: dict, path: Path) -> None:
    """The VAE's latents must be what the UNet denoises, and the embedder must fit the UNet."""
    image_size = int(info.get("image_size", vae.config.sample_size))
    vae_shape = (vae.config.latent_channels, image_size // vae_factor(vae), image_size // vae_factor(vae))
    unet_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if vae_shape != unet_shape:
        raise UserError(f"{path / 'vae'}: VAE latents are {'x'.join(map(str, vae_shape))} for {image_size}px "
                        f"patches but {path / 'unet'} denoises {'x'.join(map(str, unet_shape))}; the VAE and "
                        f"UNet do not belong together")
    if embedder.config.embed_dim != time_embed_dim(unet):
        raise UserError(f"{path / 'label_embedder'}: field 'embed_dim' is {embedder.config.embed_dim} but the UNet's "
                        f"timestep embedding has {time_embed_dim(unet)} dimensions")
