"""Real to generated: DDIM inversion of clean latents, DDIM back from the inverted noise, and SDEdit.

`MitosisPipeline` takes these methods from `RealToGenerated`; they sample through its `guided` and `denoise`.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from .schedulers import run_steps, sampler_scheduler


class RealToGenerated:
    """The pipeline's real-to-generated methods (needs `guided`, `denoise` and `scheduler` on the class)."""

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, labels: torch.Tensor, guidance: float, steps: int,
               fixed_point_iters: int = 3, strength: float = 1.0) -> torch.Tensor:
        """DDIM inversion: clean latents -> the noise that DDIM (`from_inverted`) maps back to them.

        Each DDIM step is solved backwards by fixed-point iteration, so the round trip is exact up to
        convergence. On the demo model one iteration is enough for real nuclei (8 CMU nuclei reconstruct at
        24.011 dB after one, 24.012 dB after three, 23.86 dB after none); an undertrained model needs more.
        diffusers' `DDIMInverseScheduler` takes a single step that, under v-prediction, misreads the model
        at the clean end; the few lines of algebra below avoid that.
        `strength` < 1 stops at that fraction of the schedule (partial inversion): the target label
        then only redraws what the remaining noise level leaves open, so more of the input survives.
        """
        scheduler = self._inversion_grid(steps)
        alphas = scheduler.alphas_cumprod
        gap = scheduler.config.num_train_timesteps // steps
        x = latents.float()
        for t in scheduler.timesteps[steps - run_steps(steps, strength):].flip(0):  # ascending noise levels
            t_low = int(t) - gap
            a_low = alphas[t_low] if t_low >= 0 else scheduler.final_alpha_cumprod
            a_high = alphas[int(t)]
            x_high = x
            for _ in range(1 + fixed_point_iters):
                eps = self._to_epsilon(self.guided(x_high, t, labels, guidance), x_high, a_high)
                # the forward DDIM step from x_high lands on x exactly when this holds
                x_high = (a_high / a_low).sqrt() * (x - (1 - a_low).sqrt() * eps) + (1 - a_high).sqrt() * eps
            x = x_high
        return x

    def _inversion_grid(self, steps: int) -> DDIMScheduler:
        # "leading" spacing tops out at T - T/steps: at t = T-1 the cosine schedule has zero SNR, where the
        # sample carries no information about the image and the inverse step is ill-posed
        scheduler = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="leading", steps_offset=0)
        scheduler.set_timesteps(steps)
        return scheduler

    def _to_epsilon(self, pred: torch.Tensor, sample: torch.Tensor, alpha_prod: torch.Tensor) -> torch.Tensor:
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return pred
        if kind == "v_prediction":
            return alpha_prod.sqrt() * pred + (1 - alpha_prod).sqrt() * sample
        if kind == "sample":
            return (sample - alpha_prod.sqrt() * pred) / (1 - alpha_prod).sqrt()
        raise ValueError(kind)

    @torch.no_grad()
    def from_inverted(self, noise: torch.Tensor, labels: torch.Tensor, guidance: float, steps: int,
                      strength: float = 1.0) -> torch.Tensor:
        """DDIM from `invert`'s output (made with the same `steps` and `strength`) under `labels`."""
        scheduler = self._inversion_grid(steps)
        timesteps = scheduler.timesteps[steps - run_steps(steps, strength):]
        return self.denoise(noise, labels, guidance, scheduler, timesteps)

    @torch.no_grad()
    def sdedit(self, latents: torch.Tensor, labels: torch.Tensor, guidance: float, steps: int, strength: float,
               sampler: str = "ddim", seed: int = 0) -> torch.Tensor:
        """Noise clean latents to `strength` (0..1 of the schedule), then denoise under `labels`."""
        scheduler = sampler_scheduler(self.scheduler.config, sampler)
        scheduler.set_timesteps(steps)
        begin = steps - run_steps(steps, strength)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        timesteps = scheduler.timesteps[begin:]
        noise = torch.randn((1, *latents.shape[1:]), generator=torch.Generator().manual_seed(seed)).expand_as(latents)
        noisy = scheduler.add_noise(latents, noise.contiguous().to(latents.device), timesteps[:1].repeat(len(latents)))
        generators = [torch.Generator().manual_seed(seed + 1_000_003) for _ in range(len(latents))]
        return self.denoise(noisy, labels, guidance, scheduler, timesteps, generators)
