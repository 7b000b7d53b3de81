"""What a user may ask the sampler for, checked: seeds, conditions, guidance scale, steps and schedule.

    seeds = parse_seeds("0-15")                    # [0, ..., 15]
    conditions = parse_conditions("0:1:11")        # [0.0, 0.1, ..., 1.0]
    interval, rescale = check_guidance_schedule((0.3, 1.0), 0.0)

Each check raises one `UserError` line that names the flag (or config field).
"""

from __future__ import annotations

import numpy as np

from mitosis_ldm.errors import UserError

GUIDES = ("null", "weak")  # what guidance pushes away from: the null label (classifier-free) or the weak model
MAX_INVERSION_ITERS = 10  # fixed-point iterations per inverted step that real2gen and the explorer accept


def check_conditions(conditions, flag: str = "--conditions") -> list[float]:
    values = [float(c) for c in conditions]
    for c in values:
        if not (0.0 <= c <= 1.0):  # also rejects NaN
            raise UserError(f"{flag}: condition {c:g} is outside [0, 1]")
    if not values:
        raise UserError(f"{flag}: no conditions given")
    return values


def check_distinct(values, flag: str, text: str) -> None:
    """A repeated seed or condition renders the same frames twice and counts them twice in every mean and CI."""
    seen = set()
    for v in values:
        if v in seen:
            raise UserError(f"{flag}: {v:g} appears more than once in '{text}'; give each once")
        seen.add(v)


def check_sampling_args(guidance: float, steps: int) -> None:
    if not (guidance >= 0):
        raise UserError(f"--guidance: must be >= 0, got {guidance:g}")
    if steps < 1:
        raise UserError(f"--steps: must be >= 1, got {steps}")


def check_null_guidance(value: float, flag: str = "--null-guidance") -> float:
    """The null-label term's scale: a finite number >= 0 (0 adds nothing)."""
    value = float(value)
    if not (0.0 <= value < float("inf")):
        raise UserError(f"{flag}: must be a number >= 0, got {value:g}")
    return value


def check_null_guidance_middle(value: float, flag: str = "--null-guidance-middle") -> float:
    """The share of the null-label term kept at y = 0.5 (1: the same at every label; 0: none at 0.5)."""
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise UserError(f"{flag}: must be in [0, 1] (the share of the null-label term kept at y = 0.5), "
                        f"got {value:g}")
    return value


def check_null_guidance_middle_below(value: float, flag: str = "--null-guidance-middle-below") -> float:
    """The noise level t/T at and below which the middle share applies (1: every level; above it the term is
    whole at every label)."""
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise UserError(f"{flag}: must be a noise level in [0, 1] (the middle share applies at t/T <= it), "
                        f"got {value:g}")
    return value


def check_guidance_schedule(interval, rescale, interval_flag: str = "--guidance-interval",
                            rescale_flag: str = "--guidance-rescale") -> tuple[tuple[float, float], float]:
    """A noise-level interval (low, high) with 0 <= low < high <= 1 and a rescale factor in [0, 1]."""
    try:
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise UserError(f"{interval_flag}: expected two noise levels LOW,HIGH such as 0.2,0.8; got {interval!r}") \
            from None
    if not (0.0 <= low < high <= 1.0):  # also rejects NaN
        raise UserError(f"{interval_flag}: must satisfy 0 <= LOW < HIGH <= 1 (noise levels), got {low:g},{high:g}")
    rescale = float(rescale)
    if not (0.0 <= rescale <= 1.0):
        raise UserError(f"{rescale_flag}: must be in [0, 1], got {rescale:g}")
    return (low, high), rescale


def parse_interval(text: str) -> tuple[float, float]:
    """'0.2,0.8' -> (0.2, 0.8), checked."""
    parts = str(text).split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = None
    if values is None or len(values) != 2:
        raise UserError(f"--guidance-interval: expected two noise levels LOW,HIGH such as 0.2,0.8; got '{text}'")
    return check_guidance_schedule(values, 0.0)[0]


def add_schedule_flags(parser) -> None:
    """The guidance-schedule flags that `transitions` and `generate` share (each defaults to the pipeline's)."""
    parser.add_argument("--guidance-interval", metavar="LOW,HIGH",
                        help="guide only at noise levels t/T in [LOW, HIGH], conditional elsewhere "
                             "(default: the pipeline's; 0,1 guides every step)")
    parser.add_argument("--guidance-rescale", type=float, metavar="PHI",
                        help="in [0, 1]: rescale the guided prediction toward the conditional one's std "
                             "(default: the pipeline's; 0 = off)")
    parser.add_argument("--guide", choices=GUIDES,
                        help="guide against the null label (classifier-free) or the pipeline's weak model "
                             "(autoguidance; needs a guide/, see mitosis-ldm guide); default: the pipeline's")
    parser.add_argument("--null-guidance", type=float, metavar="N",
                        help="add N x (conditional - null-label prediction) inside the interval, to either guide "
                             "(default: the pipeline's; 0 = off)")
    parser.add_argument("--null-guidance-middle", type=float, metavar="M",
                        help="in [0, 1]: the share of the null-label term kept at y = 0.5, easing from the full "
                             "term at y = 0 and 1 as 1 - (1 - M) sin²(pi y) (default: the pipeline's; 1 = flat)")
    parser.add_argument("--null-guidance-middle-below", type=float, metavar="LEVEL",
                        help="in [0, 1]: ease the null-label term toward its middle share only at noise levels "
                             "t/T <= LEVEL, whole above (default: the pipeline's; 1 = at every level)")


def check_schedule_flags(args) -> dict:
    """The schedule flags a user gave, checked before anything is loaded: keyword overrides for
    `MitosisPipeline.transitions` / `samples` (a flag left out is absent, so the pipeline's default holds)."""
    schedule = {}
    if args.guidance_interval is not None:
        schedule["guidance_interval"] = parse_interval(args.guidance_interval)
    if args.guidance_rescale is not None:
        schedule["guidance_rescale"] = check_guidance_schedule((0.0, 1.0), args.guidance_rescale)[1]
    if args.null_guidance is not None:
        schedule["null_guidance"] = check_null_guidance(args.null_guidance)
    if args.null_guidance_middle is not None:
        schedule["null_guidance_middle"] = check_null_guidance_middle(args.null_guidance_middle)
    if args.null_guidance_middle_below is not None:
        schedule["null_guidance_middle_below"] = check_null_guidance_middle_below(args.null_guidance_middle_below)
    if args.guide is not None:
        schedule["guide"] = args.guide
    return schedule


def describe_schedule(guidance: float, schedule: dict) -> str:
    """One line of what a resolved schedule (`MitosisPipeline.schedule`) samples with, for a command's summary."""
    low, high = schedule["guidance_interval"]
    text = (f"guidance {guidance:g} against the {schedule['guide']} guide on noise levels [{low:g}, {high:g}], "
            f"rescale {schedule['guidance_rescale']:g}, null-label term {schedule['null_guidance']:g}")
    middle, below = schedule.get("null_guidance_middle", 1.0), schedule.get("null_guidance_middle_below", 1.0)
    if middle != 1.0:
        text += f" ({middle:g} of it at y = 0.5" + (f", at t/T <= {below:g})" if below < 1.0 else ")")
    return text


def parse_seeds(text: str) -> list[int]:
    """'0-15' or '0,3,7' or '0-3,9' -> [ints]."""
    seeds = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                seeds += list(range(lo, hi + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise UserError(f"--seeds: expected e.g. 0-15 or 0,3,7, got '{text}'") from None
    if not seeds or min(seeds) < 0:
        raise UserError(f"--seeds: expected non-negative seeds such as 0-15, got '{text}'")
    check_distinct(seeds, "--seeds", text)
    return seeds


def parse_conditions(text: str, flag: str = "--conditions") -> list[float]:
    """'0:1:11' (start:stop:count, inclusive) or '0,0.5,1' -> floats in [0, 1]."""
    try:
        if ":" in text:
            a, b, n = text.split(":")
            count = int(n)
            if count < 1:
                raise ValueError
            values = np.linspace(float(a), float(b), count).round(6).tolist()
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected START:STOP:COUNT such as 0:1:11, or a list such as 0,0.5,1; "
                        f"got '{text}'") from None
    values = check_conditions(values, flag)
    check_distinct(values, flag, text)
    return values
