"""From denoising errors to a posterior over the label grid, and the calibration that makes it honest.

The conditional errors of one patch differ across labels by a fraction of a
percent, so `softmax(-error)` is almost flat; the posterior needs a temperature.
`fit_calibration` chooses it (and, optionally, one weight per band of
timesteps) by maximising the likelihood of the experts' votes:

    p(votes | x) = sum_g p(y_g | x) * y_g^k * (1 - y_g)^(n - k)     (k of n experts said mitotic)

Errors arrive as (N patches, D draws, K grid labels + 1 null label); the null
label's error is kept for the CSV and never enters the posterior.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from mitosis_ldm.errors import UserError


@dataclass
class Calibration:
    """logit_g = -(1 / temperature) * sum_b t_weights[b] * (share of draws in band b) * mean error in band b."""

    temperature: float
    t_bands: int = 1                      # equal-width bands over [0, num_train_timesteps)
    t_weights: list[float] = field(default_factory=lambda: [1.0])  # mean 1 over the bands that hold draws
    calibrated: bool = False              # False: the scale heuristic below, no votes seen
    fit: dict = field(default_factory=dict)  # dataset, split, patches, NLL before/after

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str) -> "Calibration":
        try:
            cal = cls(temperature=float(data["temperature"]), t_bands=int(data.get("t_bands", 1)),
                      t_weights=[float(w) for w in data.get("t_weights", [1.0])],
                      calibrated=bool(data.get("calibrated", True)), fit=dict(data.get("fit", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{where}: field 'calibration' is malformed ({err})") from None
        if not cal.temperature > 0 or len(cal.t_weights) != cal.t_bands:
            raise UserError(f"{where}: field 'calibration' needs temperature > 0 and one t_weight per t_band")
        return cal


def band_of(timesteps: np.ndarray, num_train_timesteps: int, bands: int) -> np.ndarray:
    return np.minimum((np.asarray(timesteps) * bands) // num_train_timesteps, bands - 1).astype(int)


def band_errors(errors: np.ndarray, timesteps: np.ndarray, num_train_timesteps: int, bands: int) -> np.ndarray:
    """(N, D, K) -> (N, B, K): the error summed over each band's draws, divided by all draws D."""
    which = band_of(timesteps, num_train_timesteps, bands)
    out = np.zeros((errors.shape[0], bands, errors.shape[2]), np.float64)
    for b in range(bands):
        out[:, b] = errors[:, which == b].sum(1)
    return out / errors.shape[1]


def log_posterior(errors: np.ndarray, timesteps, num_train_timesteps: int, cal: Calibration) -> np.ndarray:
    """errors (N, D, K+1) -> log p(y_g | x) (N, K) under a uniform prior over the grid."""
    cond = errors[:, :, :-1].astype(np.float64)
    per_band = band_errors(cond, timesteps, num_train_timesteps, cal.t_bands)  # (N, B, K)
    logits = -np.einsum("nbk,b->nk", per_band, np.asarray(cal.t_weights)) / cal.temperature
    return logits - logsumexp(logits, axis=1, keepdims=True)


def summaries(prob: np.ndarray, grid) -> dict[str, np.ndarray]:
    """E[y], the MAP y and the posterior std of (N, K) probabilities over `grid`."""
    grid = np.asarray(grid, np.float64)
    expected = prob @ grid
    return {"expected_y": expected, "map_y": grid[prob.argmax(1)],
            "posterior_std": np.sqrt(np.maximum(prob @ grid ** 2 - expected ** 2, 0.0))}


def scale_heuristic(errors: np.ndarray) -> float:
    """An uncalibrated temperature: the typical spread of the mean error over the grid (never zero)."""
    spread = errors[:, :, :-1].mean(1).std(1)
    value = float(np.median(spread)) if len(spread) else 0.0
    return value if value > 0 else 1e-6


# -- votes -------------------------------------------------------------------------------

def parse_votes(votes: str, soft_label: float, where: str) -> tuple[float, float]:
    """'1;1;0' -> (2 mitotic, 3 experts); without votes the soft label counts as one fractional vote."""
    text = (votes or "").strip()
    if text:
        try:
            calls = [float(v) for v in text.replace(",", ";").split(";") if v.strip()]
        except ValueError:
            raise UserError(f"{where}: field 'votes' has '{votes}', expected e.g. 1;1;0") from None
        if calls and all(c in (0.0, 1.0) for c in calls):
            return float(sum(calls)), float(len(calls))
        raise UserError(f"{where}: field 'votes' has '{votes}', expected 0/1 calls such as 1;1;0")
    if math.isfinite(soft_label):
        return float(soft_label), 1.0
    return math.nan, math.nan


def vote_log_likelihood(grid) -> callable:
    grid = np.clip(np.asarray(grid, np.float64), 1e-6, 1 - 1e-6)  # 0^0 stays 1; 0^k stays ~0 but finite

    def table(k: np.ndarray, n: np.ndarray) -> np.ndarray:  # (N, K) log P(votes | y_g)
        return k[:, None] * np.log(grid)[None] + (n - k)[:, None] * np.log1p(-grid)[None]

    return table


def negative_log_likelihood(log_post: np.ndarray, vote_table: np.ndarray) -> float:
    return float(-logsumexp(log_post + vote_table, axis=1).mean())


# -- the fit -----------------------------------------------------------------------------

def lowest_finite(results: list):
    """The optimiser result with the lowest finite objective (the first such on ties); None when none is finite."""
    finite = [r for r in results if np.isfinite(r.fun)]
    return min(finite, key=lambda r: r.fun) if finite else None


def fit_calibration(errors: np.ndarray, timesteps, num_train_timesteps: int, grid, mitotic: np.ndarray,
                    experts: np.ndarray, t_bands: int = 1, fit_info: dict | None = None) -> Calibration:
    """Inverse temperatures per timestep band that maximise the mean log-likelihood of the votes."""
    keep = np.isfinite(mitotic) & np.isfinite(experts) & (experts > 0)
    if keep.sum() < 2:
        raise UserError("--calibrate: fewer than 2 patches carry votes or a soft label; nothing to fit")
    errors = errors[keep]
    timesteps = np.asarray(timesteps)
    bands = band_of(timesteps, num_train_timesteps, t_bands)
    if len(set(bands.tolist())) < t_bands:
        raise UserError(f"--t-bands: {t_bands} bands but the {len(timesteps)} draws fill only "
                        f"{len(set(bands.tolist()))}; use more --draws or fewer bands")
    per_band = band_errors(errors[:, :, :-1].astype(np.float64), timesteps, num_train_timesteps, t_bands)
    per_band = per_band - per_band.min(axis=2, keepdims=True)  # a per-patch constant does not move the posterior
    votes = vote_log_likelihood(grid)(mitotic[keep], experts[keep])
    scale = scale_heuristic(errors)

    def nll(log_beta: np.ndarray) -> float:
        with np.errstate(over="ignore"):  # a start that runs away (log beta in the thousands) gives a non-finite
            beta = np.exp(log_beta)       # NLL, and the lowest finite one among the starts is kept below
        logits = -np.einsum("nbk,b->nk", per_band, beta)
        return negative_log_likelihood(logits - logsumexp(logits, axis=1, keepdims=True), votes)

    start = np.full(t_bands, -math.log(scale))
    # a few starts: the NLL is flat far from the optimum
    best = lowest_finite([minimize(nll, start + shift, method="L-BFGS-B") for shift in (0.0, 2.0, 4.0, -2.0)])
    if best is None:
        raise UserError(f"--calibrate: the temperature fit found no finite vote likelihood from any start "
                        f"({int(keep.sum())} patches); check their votes and soft labels, or pass --temperature")
    beta = np.exp(best.x)
    temperature = float(1.0 / beta.mean())
    flat = Calibration(temperature=scale)
    before = nll(np.full(t_bands, -math.log(scale)))
    return Calibration(temperature=temperature, t_bands=t_bands, t_weights=(beta / beta.mean()).tolist(),
                       calibrated=True,
                       fit={**(fit_info or {}), "patches": int(keep.sum()), "heuristic_temperature": flat.temperature,
                            "nll_votes_heuristic": before, "nll_votes_fitted": float(best.fun),
                            "optimizer": "scipy L-BFGS-B", "converged": bool(best.success)})
