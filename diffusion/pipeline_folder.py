"""Reading a pipeline folder's parts so that any damage is one line naming the folder and the part.

`load_parts(path)` is what `MitosisPipeline.from_pretrained` runs after the
marker and the recorded hashes are checked: every part must be present, load
(truncated safetensors, a `scheduler_config.json` that is not JSON, config
fields of the wrong type all become `PART: cannot be loaded (...)`), and
`pipeline.json` must hold fields of the right types that agree with the parts.
An optional `guide/` (autoguidance's weak model: `guide/unet/`, `guide/label_embedder/`)
is checked the same way, and must denoise the same latents as `unet/`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from mitosis_ldm.artifacts import config_object, load_part, strict_loader
from mitosis_ldm.errors import UserError
from mitosis_ldm.io import read_json

from .model import LabelEmbedder


SCHEDULER_NUMBER_LIMIT = 1e6  # beyond any beta, range, ratio or count a noise schedule holds


def check_scheduler_fields(path: Path, config: dict) -> None:
    """Each field DDPMScheduler takes must have its default's type (a bool, a whole number, a finite number no
    larger than SCHEDULER_NUMBER_LIMIT, a string): diffusers stores what it is given, and a `clip_sample_range` of
    "nan" or 1e308 failed at the first sampling step as a TypeError or RuntimeError."""
    import inspect

    for key, param in inspect.signature(DDPMScheduler.__init__).parameters.items():
        if key not in config or param.default is None or param.default is inspect.Parameter.empty:
            continue
        value, default = config[key], param.default
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, (int, float)):
            whole = isinstance(default, int)
            ok = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value) and abs(value) <= SCHEDULER_NUMBER_LIMIT
            want = f"a {'whole' if whole else 'finite'} number of at most {SCHEDULER_NUMBER_LIMIT:g}"
        else:
            ok, want = isinstance(value, str), "a string"
        if not ok:
            raise UserError(f"{path}: field '{key}' must be {want}, got {str(value)[:40]!r}")


def load_scheduler(folder: Path) -> DDPMScheduler:
    """The noise schedule; its levels must be `num_train_timesteps` cumulative alphas in (0, 1] (diffusers builds
    whatever `trained_betas` or the `beta_*` fields say, and a scalar there failed mid-sampling as an IndexError)."""
    config = config_object(folder / "scheduler_config.json")  # settings, not a name diffusers would look up
    if config is not None:
        check_scheduler_fields(folder / "scheduler_config.json", config)
    scheduler = DDPMScheduler.from_pretrained(folder, local_files_only=True)
    alphas, n = scheduler.alphas_cumprod, scheduler.config.num_train_timesteps
    if alphas.ndim != 1 or len(alphas) != n or not bool(torch.isfinite(alphas).all()) \
            or bool((alphas <= 0).any() or (alphas > 1).any()):
        raise UserError(f"{folder / 'scheduler_config.json'}: its noise schedule is not {n} levels in (0, 1] "
                        f"(fields 'trained_betas', 'beta_start', 'beta_end', 'beta_schedule', "
                        f"'num_train_timesteps')")
    return scheduler


PARTS = {  # part folder -> (file that must be there, loader)
    "vae": ("config.json", strict_loader(AutoencoderKL)),
    "unet": ("config.json", strict_loader(UNet2DModel)),
    "label_embedder": ("config.json", strict_loader(LabelEmbedder)),
    "scheduler": ("scheduler_config.json", load_scheduler),
}
GUIDE_PARTS = ("unet", "label_embedder")  # under guide/
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def load_parts(path: Path):
    """(vae, unet, label_embedder, scheduler, info, guide) of a pipeline folder, each checked; guide is
    (unet, label_embedder) or None."""
    for part, (marker, _) in PARTS.items():
        if not (path / part / marker).exists():
            raise UserError(f"{path}: pipeline part '{part}/' is missing ({part}/{marker} not found); "
                            f"export the pipeline again")
    info = read_json(path / "pipeline.json", "pipeline.json")
    loaded = {part: load_part(path / part, f"pipeline part '{part}/'", loader) for part, (_, loader) in PARTS.items()}
    check_info(info, loaded["unet"], loaded["scheduler"], path / "pipeline.json")
    computes(path, loaded["unet"], loaded["label_embedder"])
    guide = load_guide(path, info, loaded["unet"])
    return loaded["vae"], loaded["unet"], loaded["label_embedder"], loaded["scheduler"], info, guide


def load_guide(path: Path, info: dict, unet):
    """guide/'s (unet, label_embedder), None when the folder has none; `default_guide: weak` needs one."""
    folder = path / "guide"
    if not folder.exists():
        if info.get("default_guide", "null") == "weak":
            raise UserError(f"{path / 'pipeline.json'}: field 'default_guide' is 'weak' but {folder} is missing")
        return None
    for part in GUIDE_PARTS:
        if not (folder / part / "config.json").exists():
            raise UserError(f"{folder}: guide part '{part}/' is missing ({part}/config.json not found)")
    weak = {part: load_part(folder / part, f"guide part '{part}/'", PARTS[part][1]) for part in GUIDE_PARTS}
    c, w = unet.config, weak["unet"].config
    if (w.in_channels, w.out_channels, w.sample_size) != (c.in_channels, c.out_channels, c.sample_size):
        raise UserError(f"{folder / 'unet'}: the guide denoises {w.in_channels}x{w.sample_size}x{w.sample_size} "
                        f"latents but unet/ denoises {c.in_channels}x{c.sample_size}x{c.sample_size}")
    computes(folder, weak["unet"], weak["label_embedder"])
    return weak["unet"], weak["label_embedder"]


def computes(path: Path, unet, embedder) -> None:
    """One UNet call on one latent: config fields that construct but cannot compute (a float kernel size, ...)."""
    import torch

    c = unet.config
    try:
        with torch.no_grad():
            emb = embedder(torch.tensor([0.5, float("nan")]))
            unet(torch.zeros(2, c.in_channels, c.sample_size, c.sample_size), torch.tensor([0, 0]), class_labels=emb)
    except Exception as err:  # noqa: BLE001 - any failure here is a damaged config
        raise UserError(f"{path / 'unet'}: pipeline part 'unet/' cannot compute with its config.json "
                        f"({type(err).__name__}: {' '.join(str(err).split())[:160]})") from None


def check_info(info, unet, scheduler, where: Path) -> None:
    """pipeline.json: types, ranges, and agreement with the UNet and the noise schedule."""
    from .schedulers import SAMPLERS
    from .sampling_args import GUIDES

    def need(ok: bool, field: str, expected: str):
        if not ok:
            raise UserError(f"{where}: field '{field}' must be {expected}")

    def num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(isinstance(info, dict), "<root>", "a JSON object")
    get = info.get
    need(whole(get("image_size", 8)) and 8 <= get("image_size", 8) <= 4096, "image_size", "an integer in [8, 4096]")
    need(num(get("default_guidance", 0)) and get("default_guidance", 0) >= 0, "default_guidance", "a number >= 0")
    need(whole(get("default_steps", 1)) and get("default_steps", 1) >= 1, "default_steps", "an integer >= 1")
    need(get("default_sampler", "ddim") in SAMPLERS, "default_sampler", "one of " + ", ".join(SAMPLERS))
    need(num(get("default_real2gen_guidance", 0)) and get("default_real2gen_guidance", 0) >= 0,
         "default_real2gen_guidance", "a number >= 0")
    need(num(get("default_real2gen_strength", 1)) and 0 <= get("default_real2gen_strength", 1) <= 1,
         "default_real2gen_strength", "a number in [0, 1]")
    interval = get("default_guidance_interval", [0.0, 1.0])
    need(isinstance(interval, list) and len(interval) == 2 and all(num(v) for v in interval)
         and 0 <= interval[0] < interval[1] <= 1, "default_guidance_interval", "[LOW, HIGH] with 0 <= LOW < HIGH <= 1")
    need(num(get("default_guidance_rescale", 0)) and 0 <= get("default_guidance_rescale", 0) <= 1,
         "default_guidance_rescale", "a number in [0, 1]")
    need(num(get("default_null_guidance", 0)) and 0 <= get("default_null_guidance", 0) < float("inf"),
         "default_null_guidance", "a number >= 0")
    need(num(get("default_null_guidance_middle", 1)) and 0 <= get("default_null_guidance_middle", 1) <= 1,
         "default_null_guidance_middle", "a number in [0, 1]")
    need(num(get("default_null_guidance_middle_below", 1)) and 0 <= get("default_null_guidance_middle_below", 1) <= 1,
         "default_null_guidance_middle_below", "a noise level in [0, 1]")
    need(get("default_guide", "null") in GUIDES, "default_guide", "one of " + ", ".join(f"'{g}'" for g in GUIDES))
    need(num(get("latent_scale", 1)) and get("latent_scale", 1) > 0, "latent_scale", "a positive number")
    unet_shape = [unet.config.in_channels, unet.config.sample_size, unet.config.sample_size]
    need(get("latent_shape", unet_shape) == unet_shape, "latent_shape",
         f"the UNet's {unet_shape} (pipeline.json and unet/config.json disagree)")
    kind = scheduler.config.prediction_type
    steps = scheduler.config.num_train_timesteps
    if kind not in PREDICTION_TYPES or not whole(steps) or steps < 2:
        raise UserError(f"{where.parent / 'scheduler' / 'scheduler_config.json'}: fields 'prediction_type' "
                        f"({kind!r}) / 'num_train_timesteps' ({steps!r}) must be one of "
                        f"{', '.join(PREDICTION_TYPES)} / an integer >= 2")
    need(get("prediction_type", kind) == kind, "prediction_type",
         f"the scheduler's '{kind}' (pipeline.json and scheduler/scheduler_config.json disagree)")
