"""Fidelity and memorisation of generated patches.

- `frechet(a, b)`: the Fréchet distance between Gaussians fitted to two feature
  sets (N, D) — FID's formula, in the classifier's feature space.
- `frechet_per_bin`: generated vs held-out real per label bin, beside the
  yardstick real-half vs real-half at the same sample size (the distance is
  biased by sample size, so both sides use equal n); and the same ratio with
  every bin at the smallest bin's n, since the ratio itself grows with n.
- `frechet_per_condition`: the same comparison for each condition's frames
  alone, against the real patches of its bin: which condition of a bin is the
  unfaithful one.
- `ratio_intervals`: how far each bin's ratio, and the worst bin's, would move
  with another set of seeds (half-samples of the seeds).
- `mixture_weights`, `calibrated_draws`: the calibrated real reference. Real
  patches drawn for each generated frame as a gradual, calibrated generator
  would render it: between two adjacent real soft labels a < y < b, label b
  with probability (y - a) / (b - a). Its mean score follows the real
  label-response curve by linear interpolation, so its per-bin Fréchet ratio
  is what a faithful gradual transition made of real patches scores.
- `memorisation`: the share of generated patches closer to a training patch
  than (almost all) held-out real patches are.
- `atypical`: the other tail of the same distances, the share of generated
  patches farther from every training patch than (almost all) held-out real
  patches are: frames that left the real data, such as a frame in another
  tissue's colours or without a nucleus.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from scipy import linalg
from threadpoolctl import threadpool_limits


@contextmanager
def one_blas_thread():
    """A context (and decorator) that runs numpy's and scipy's BLAS/LAPACK on one thread; torch's own threads stay.
    The report's linear algebra is thousands of small problems (one `frechet` is a (N, N) SVD with N of 41-285
    in the demo), where OpenBLAS's threads cost more than they give: on a 2-core host `frechet` of two (118, 256)
    feature sets took 15.5 ms on two threads and 1.3 ms on one, and the demo's report 71 s against 56 s. The
    libraries are looked up on entry, so BLAS loaded after import is limited too."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# Samples per feature dimension up to which `frechet` takes the singular values of the cross matrix. On one
# BLAS thread (the report's) with D = 256 features: 6.1 ms against 11.0 ms for the eigen-decompositions at
# N = 285, 10.2 against 11.6 at N = 350, 13.4 against 12.0 at N = 400.
SVD_UP_TO = 1.5


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||² + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^½) for features (N, D).

    Tr((S_a S_b)^½) is the sum of the square roots of the (non-negative)
    eigenvalues of S_a S_b: the number `scipy.linalg.sqrtm` would give, computed
    without it. Those are the singular values of the (N_a, N_b) matrix
    A B^T / sqrt((N_a - 1)(N_b - 1)) of centred features, since S_a S_b = A^T A B^T B / c
    shares its non-zero eigenvalues with (A B^T)(A B^T)^T / c. That matrix is the cheaper route up to
    about `SVD_UP_TO` x D samples (every bin of the demo's report); above, two (D, D) symmetric
    eigen-decompositions are.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    centred_a, centred_b = a - mu_a, b - mu_b                             # (N_a, D), (N_b, D)
    scale = np.sqrt((len(a) - 1) * (len(b) - 1))
    traces = (centred_a ** 2).sum() / (len(a) - 1) + (centred_b ** 2).sum() / (len(b) - 1)
    if min(len(a), len(b)) < SVD_UP_TO * a.shape[1]:
        trace_sqrt = linalg.svdvals(centred_a @ centred_b.T).sum() / scale
    else:
        # few dimensions: S_a S_b has the eigenvalues of the symmetric S_a^½ S_b S_a^½
        cov_a = centred_a.T @ centred_a / (len(a) - 1)
        cov_b = centred_b.T @ centred_b / (len(b) - 1)
        w, v = linalg.eigh(cov_a)
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        trace_sqrt = np.sqrt(np.clip(linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + traces - 2 * trace_sqrt)


def frechet_per_bin(generated: np.ndarray, generated_bins: np.ndarray, real: np.ndarray, real_bins: np.ndarray,
                    n_bins: int, min_count: int = 8, repeats: int = 5, seed: int = 0,
                    reconstructed: np.ndarray | None = None) -> list[dict]:
    """Per bin: Fréchet(generated, real half B) and the yardstick Fréchet(real half A, real half B).

    n = min(#generated, #real // 2); each repeat draws fresh disjoint halves and a
    fresh generated subsample; the distances are averaged over repeats.
    Both distances shrink as n grows, the yardstick (two samples of one
    distribution) toward 0, so the same gap gives a larger ratio in a bin with
    more patches. `ratio_common_n` therefore repeats the comparison with every
    bin at `common_n`, the smallest n among the bins that have enough patches.
    `reconstructed`: features of the real patches' autoencoder reconstructions, row for row. Each bin then
    also gets its autoencoder floor, Fréchet(reconstructions of half A, half B) over the same halves
    (`floor`, and `floor_ratio` against the same yardstick): what a latent generator that reproduced the real
    patches' latents exactly would score. The other numbers do not change (no extra random draws).
    """
    rng = np.random.default_rng(seed)
    rows, members = [], []
    for b in range(n_bins):
        gen = generated[generated_bins == b]
        ref = real[real_bins == b]
        rec = None if reconstructed is None else reconstructed[real_bins == b]
        n = min(len(gen), len(ref) // 2)
        row = {"bin": b, "n_generated": int(len(gen)), "n_real": int(len(ref)), "n": int(n),
               "frechet": None, "yardstick": None, "ratio": None, "floor": None, "floor_ratio": None,
               "common_n": None, "frechet_common_n": None, "yardstick_common_n": None, "ratio_common_n": None}
        if n >= min_count:
            row["frechet"], row["yardstick"], row["ratio"], row["floor"] = _compare(gen, ref, n, repeats, rng, rec)
            if row["floor"] is not None and row["yardstick"] > 0:
                row["floor_ratio"] = row["floor"] / row["yardstick"]
        rows.append(row)
        members.append((gen, ref))
    valid = [r for r in rows if r["frechet"] is not None]
    if valid:
        common = min(r["n"] for r in valid)
        rng = np.random.default_rng(seed + 1)  # fresh draws: the own-n numbers above stay as they were
        for row in valid:
            gen, ref = members[row["bin"]]
            row["common_n"] = int(common)
            row["frechet_common_n"], row["yardstick_common_n"], row["ratio_common_n"], _ = \
                _compare(gen, ref, common, repeats, rng)
    return rows


def mixture_weights(y: float, labels: np.ndarray) -> np.ndarray:
    """Probability of each real soft label (`labels`, ascending) for a frame at condition `y`: all on a label
    that `y` equals (or on the end label beyond the range), else split linearly between the two labels around
    `y`, so that any quantity's mean over the draws is the real one interpolated linearly at `y`."""
    labels = np.asarray(labels, dtype=float)
    weights = np.zeros(len(labels))
    b = int(np.searchsorted(labels, y, side="left"))
    if b < len(labels) and np.isclose(labels[b], y):
        weights[b] = 1.0
    elif b == 0 or b == len(labels):
        weights[min(b, len(labels) - 1)] = 1.0
    else:
        t = (y - labels[b - 1]) / (labels[b] - labels[b - 1])
        weights[b - 1], weights[b] = 1.0 - t, t
    return weights


def calibrated_draws(conditions: np.ndarray, pool_labels: np.ndarray, labels: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """For each generated row's condition, the index of a pool patch whose soft label (`pool_labels`) is drawn by
    `mixture_weights` over `labels`. Within a label, patches are drawn without replacement until they run out,
    then again in the same order. -> (indices, repeats: the draws past a label's last unused patch)."""
    labels = np.asarray(labels, dtype=float)
    members = [rng.permutation(np.flatnonzero(np.isclose(pool_labels, v))) for v in labels]
    if any(len(m) == 0 for m in members):
        raise ValueError("every label needs at least one pool patch")
    used = np.zeros(len(labels), dtype=int)
    picks = np.empty(len(conditions), dtype=int)
    for i, y in enumerate(np.asarray(conditions, dtype=float)):
        k = rng.choice(len(labels), p=mixture_weights(y, labels))
        picks[i] = members[k][used[k] % len(members[k])]
        used[k] += 1
    repeats = int(sum(max(0, u - len(m)) for u, m in zip(used, members)))
    return picks, repeats


def frechet_per_condition(generated: np.ndarray, generated_conditions: np.ndarray, generated_bins: np.ndarray,
                          real: np.ndarray, real_bins: np.ndarray, min_count: int = 8, repeats: int = 5,
                          seed: int = 0) -> list[dict]:
    """Per condition: its frames alone against the held-out real patches of the label bin it falls in.

    A bin's ratio (`frechet_per_bin`) pools the frames of every condition in the bin (0, 0.1 and 0.2 in the
    lowest of four), so one unfaithful condition hides among faithful ones. Each row here is the same
    comparison for one condition: n = min(#frames at the condition, #real in its bin // 2), real halves and
    frames redrawn each repeat, from a generator of its own (the per-bin numbers do not change).
    """
    rng = np.random.default_rng(seed + 2)
    rows = []
    for condition in np.unique(generated_conditions):
        at = generated_conditions == condition
        b = int(generated_bins[at][0])
        gen, ref = generated[at], real[real_bins == b]
        n = min(len(gen), len(ref) // 2)
        row = {"condition": float(condition), "bin": b, "n_generated": int(len(gen)), "n_real": int(len(ref)),
               "n": int(n), "frechet": None, "yardstick": None, "ratio": None}
        if b >= 0 and n >= min_count:
            row["frechet"], row["yardstick"], row["ratio"], _ = _compare(gen, ref, n, repeats, rng)
        rows.append(row)
    return rows


def ratio_intervals(generated: np.ndarray, generated_bins: np.ndarray, generated_groups: np.ndarray,
                    real: np.ndarray, real_bins: np.ndarray, rows: list[dict], n_resamples: int = 100,
                    repeats: int = 5, level: float = 0.95, seed: int = 0, min_groups: int = 4) -> dict:
    """Intervals over seeds for each bin's ratio (`frechet_per_bin` rows) and for the worst bin's.

    `generated_groups` names the seed (transition) each generated row belongs to: the frames of one seed share
    its noise, so seeds, not frames, are the units another run would redraw. Each resample keeps a random half of
    the seeds (without replacement) and measures every bin again as the row was measured: at the row's own n,
    averaged over `repeats` fresh draws of its frames and of a real half, divided by the row's yardstick. A half
    of S seeds varies around the whole set about as much as S seeds vary between runs (the finite-population
    factor 1 - 1/2 cancels the halved size), and without the repeated frames a with-replacement draw would put
    in one Fréchet fit. A half draws more frames from each seed, though, and the frames of one seed are alike,
    so its ratios read high where n is a large share of the frames; the interval is therefore the spread of
    the resamples around their median, placed around the row's own ratio. A bin whose half of the seeds has
    fewer frames than its n gets none, and then so does the worst bin.

    Returns {"bins": [[low, high] or None per row], "worst": [low, high] or None, "n_resamples", "n_groups"}.
    """
    groups = np.unique(generated_groups)
    columns = [j for j, row in enumerate(rows) if row["ratio"] is not None]
    if len(groups) < min_groups or not columns or n_resamples < 1:
        return {"bins": [None] * len(rows), "worst": None, "n_resamples": 0, "n_groups": int(len(groups))}
    # per measured bin, once: its generated rows and its real patches
    in_bin = {j: generated_bins == rows[j]["bin"] for j in columns}
    refs = {j: real[real_bins == rows[j]["bin"]] for j in columns}
    rng = np.random.default_rng(seed + 3)  # a generator of its own: the per-bin numbers do not change
    half = len(groups) // 2
    draws = np.full((n_resamples, len(rows)), np.nan)
    for k in range(n_resamples):
        kept = np.isin(generated_groups, rng.choice(groups, half, replace=False))
        for j in columns:
            pool, ref, n = generated[kept & in_bin[j]], refs[j], rows[j]["n"]
            if len(pool) < n:
                continue
            distances = [frechet(pool[rng.permutation(len(pool))[:n]], ref[rng.permutation(len(ref))[:n]])
                         for _ in range(repeats)]
            draws[k, j] = float(np.mean(distances)) / rows[j]["yardstick"]
    alpha = (1 - level) / 2

    def interval(values, estimate):
        low, middle, high = np.quantile(values, [alpha, 0.5, 1 - alpha])
        return [float(estimate + low - middle), float(estimate + high - middle)]

    bins = [interval(draws[:, j], rows[j]["ratio"]) if j in columns and np.isfinite(draws[:, j]).all() else None
            for j in range(len(rows))]
    covered = all(bins[j] is not None for j in columns)
    worst = interval(draws[:, columns].max(axis=1), max(rows[j]["ratio"] for j in columns)) if covered else None
    return {"bins": bins, "worst": worst, "n_resamples": int(n_resamples), "n_groups": int(len(groups))}


def _compare(gen: np.ndarray, ref: np.ndarray, n: int, repeats: int, rng, rec: np.ndarray | None = None):
    """(Fréchet(generated, real half B), Fréchet(real half A, real half B), their ratio,
    Fréchet(reconstructions of half A, real half B) or None), n rows each, averaged over repeats."""
    fd, yard, floor = [], [], []
    for _ in range(repeats):
        perm = rng.permutation(len(ref))
        half_a, half_b = ref[perm[:n]], ref[perm[n: 2 * n]]
        gen_n = gen[rng.permutation(len(gen))[:n]]
        fd.append(frechet(gen_n, half_b))
        yard.append(frechet(half_a, half_b))
        if rec is not None:
            floor.append(frechet(rec[perm[:n]], half_b))
    distance, yardstick = float(np.mean(fd)), float(np.mean(yard))
    return (distance, yardstick, distance / yardstick if yardstick > 0 else None,
            float(np.mean(floor)) if floor else None)


def pixel_rows(images) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, H*W*3) float32 in [0, 1]: the pixel space nearest neighbours are searched in."""
    return np.asarray(images, np.float32).reshape(len(images), -1) / np.float32(255.0)


def nearest_distances(queries: np.ndarray, reference: np.ndarray, chunk: int = 256, candidates: int = 4) -> np.ndarray:
    """Euclidean distance from each query (N, D) to its nearest reference row (M, D): (N,).

    The |q|² + |r|² - 2 q·r expansion in float32 finds a few candidates fast; the
    distances to those are then computed directly, since the expansion cancels
    badly for near-copies (exactly the case memorisation looks for).
    """
    queries = np.asarray(queries, np.float32)
    reference = np.asarray(reference, np.float32)
    ref_sq = (reference ** 2).sum(1)
    k = min(candidates, len(reference))
    out = np.empty(len(queries), np.float64)
    for start in range(0, len(queries), chunk):
        q = queries[start: start + chunk]
        d2 = ref_sq[None, :] - 2 * q @ reference.T                        # (n, M), |q|² is constant per row
        near = np.argpartition(d2, k - 1, axis=1)[:, :k]                  # (n, k)
        diff = q[:, None, :].astype(np.float64) - reference[near].astype(np.float64)  # (n, k, D)
        out[start: start + chunk] = np.sqrt((diff ** 2).sum(-1)).min(1)
    return out


def memorisation(generated: np.ndarray, held_out: np.ndarray, train: np.ndarray, quantile: float = 0.01) -> dict:
    """Share of generated patches nearer to the training set than the `quantile` of held-out real patches.

    A model that generalises puts about `quantile` of its samples below that
    threshold (as close to training data as an unseen real patch can be); a
    model that copies training patches puts many more there.
    """
    d_gen = nearest_distances(generated, train)
    d_real = nearest_distances(held_out, train)
    threshold = float(np.quantile(d_real, quantile))
    return {
        "share": float(np.mean(d_gen < threshold)),
        "quantile": quantile,
        "threshold": threshold,
        "generated_median": float(np.median(d_gen)),
        "held_out_median": float(np.median(d_real)),
        "n_generated": int(len(d_gen)),
        "n_held_out": int(len(d_real)),
        "n_train": int(len(train)),
        "distances_generated": d_gen,
        "distances_held_out": d_real,
    }


def atypical(d_generated: np.ndarray, d_held_out: np.ndarray, quantile: float = 0.01) -> dict:
    """Generated patches farther from the training set than the `1 - quantile` quantile of held-out real patches.

    `d_generated` and `d_held_out` are nearest-training-patch distances (`memorisation`'s). A generator that
    stays on the real data puts about `quantile` of its samples above that threshold; `beyond_all` counts those
    farther than every held-out patch. `flagged` indexes `d_generated`, farthest first.
    """
    d_generated, d_held_out = np.asarray(d_generated, np.float64), np.asarray(d_held_out, np.float64)
    threshold = float(np.quantile(d_held_out, 1 - quantile))
    farthest = float(d_held_out.max())
    flagged = np.flatnonzero(d_generated > threshold)
    flagged = flagged[np.argsort(-d_generated[flagged], kind="stable")]
    return {
        "share": float(len(flagged) / len(d_generated)),
        "expected_share": quantile,
        "threshold": threshold,
        "beyond_all_share": float(np.mean(d_generated > farthest)),
        "held_out_max": farthest,
        "n_generated": int(len(d_generated)),
        "n_held_out": int(len(d_held_out)),
        "flagged": flagged,
    }
