"""The samplers a pipeline can run: diffusers schedulers sharing the training noise schedule, and how many steps
a partial trajectory (SDEdit, partial inversion, the explorer's edits) takes."""

from __future__ import annotations

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UniPCMultistepScheduler)

from mitosis_ldm.errors import UserError

SAMPLERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


def sampler_scheduler(base_config, name: str):
    """A diffusers scheduler of kind `name` sharing the training noise schedule."""
    if name not in SAMPLERS:
        raise UserError(f"--sampler: must be one of {', '.join(SAMPLERS)}, got '{name}'")
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
    # trailing spacing starts at t = T-1, which few-step sampling needs to begin from pure noise
    return SAMPLERS[name].from_config(base_config, timestep_spacing="trailing", **extra)


def run_steps(steps: int, strength: float) -> int:
    """How many of `steps` a partial trajectory of `strength` (0..1 of the schedule) takes; at least one."""
    return max(1, min(steps, int(round(steps * strength))))
