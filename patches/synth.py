"""Synthetic H&E nucleus patches with a known mitotic degree m in [0, 1] and simulated expert votes.

    mitosis-ldm data synth --out runs/demo/data/synth --n 6000 --size 64 --experts 3 --seed 0

Each patch is one cell in stroma. The true degree m (stored as `true_degree`)
drives, smoothly: chromatin condensation (fine granular -> clumped), nuclear
darkness, an irregular/spiky outline, the nucleus/cytoplasm contrast (the
cytoplasm of a mitotic cell clears) and cytoplasm granularity. Nuisances vary
independently of m: nucleus size, orientation, elongation, stain colour and
strength, blur, sensor noise and neighbouring cells partly in view.
Imposters (`kind` = imposter) are dark, round, smooth, homogeneous
(pyknotic-like) nuclei with low m: the look-alikes that fool experts.

Images are formed by Beer-Lambert absorption with scikit-image's H&E stain
vectors (`skimage.color.rgb_from_hed`), so colours are those of real stains.
Rendering is vectorised over a batch of patches (all arrays are (B, S, S));
random textures are band-limited noise made in the Fourier domain.

Experts: K simulated pathologists, each with an own threshold (around 0.5) and
an own perception noise, vote on every patch; imposters push the perceived
degree up. label = mean vote, hard_label = majority (ties round half up).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.fft

from .dataset import Shard

TRUE_THRESHOLD = 0.5


@dataclass
class Experts:
    """The simulated pathologists: a threshold, a perception-noise std and a lapse rate each.

    A lapse is a plain mistake (the vote flips), as when a figure is overlooked:
    it is why even clear-cut patches are sometimes not unanimous.
    """

    thresholds: list[float]
    noise: list[float]
    lapse: list[float]
    imposter_bias: float = 0.3  # how far an imposter's dark round look pushes the perceived degree, at most

    @classmethod
    def draw(cls, k: int, seed: int) -> "Experts":
        rng = np.random.default_rng([seed, 7919])
        thresholds = np.clip(rng.normal(TRUE_THRESHOLD, 0.08, size=k), 0.3, 0.7)
        noise = rng.uniform(0.12, 0.22, size=k)
        lapse = rng.uniform(0.01, 0.05, size=k)
        return cls(*([round(float(v), 4) for v in values] for values in (thresholds, noise, lapse)))

    def vote(self, degree: np.ndarray, imposter: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Votes (B, K) in {0, 1}: expert k calls a patch mitotic when its perceived degree passes its threshold."""
        k = len(self.thresholds)
        fooled = imposter * rng.uniform(0, self.imposter_bias, size=degree.shape)  # (B,)
        perceived = (degree + fooled)[:, None] + rng.normal(size=(len(degree), k)) * np.asarray(self.noise)[None]
        votes = perceived >= np.asarray(self.thresholds)[None]
        lapses = rng.random((len(degree), k)) < np.asarray(self.lapse)[None]
        return (votes ^ lapses).astype(np.int8)

    def hard_label_probability(self, degree: np.ndarray, imposter: np.ndarray, draws: int = 2000,
                               seed: int = 0) -> np.ndarray:
        """P(hard label = 1) per patch, given its true degree and imposter flag: the share of `draws` panels
        (Monte Carlo over `vote`) whose mean vote is >= 0.5. No scorer of the patches ranks their hard labels
        better in expectation: the label noise's ceiling on AUROC."""
        rng = np.random.default_rng(seed)
        degree = np.asarray(degree, np.float64)
        imposter = np.asarray(imposter, np.float64)
        hits = np.zeros(len(degree))
        for _ in range(draws):
            hits += self.vote(degree, imposter, rng).mean(1) >= 0.5
        return hits / draws


def draw_degree(n: int, rng: np.random.Generator, imposter_rate: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """True degree m and imposter flag. m is a mixture: mass near 0, near 1 and spread between."""
    component = rng.choice(3, size=n, p=[0.3, 0.25, 0.45])
    m = np.where(component == 0, rng.beta(1.0, 9.0, size=n),
                 np.where(component == 1, rng.beta(9.0, 1.0, size=n), rng.uniform(size=n)))
    imposter = rng.random(n) < imposter_rate
    m = np.where(imposter, rng.uniform(0.0, 0.25, size=n), m)
    return m.astype(np.float32), imposter


# -- texture helpers -----------------------------------------------------------

def band_noise(rng: np.random.Generator, batch: int, size: int, sigma, anisotropy: np.ndarray | None = None,
               angle: np.ndarray | None = None) -> np.ndarray:
    """Gaussian-smoothed white noise of (nearly) unit std, (B, S, S) float32, made in one inverse FFT.

    `sigma` may be per patch (B,) (that is how the optical blur reaches textures). With
    `anisotropy` > 1 (per patch) the blur is stretched along `angle`: fibrous stroma.
    Fourier coefficients are uniform, not normal (5x cheaper); each output pixel sums
    thousands of them, so the field is Gaussian all the same.
    """
    fy = scipy.fft.fftfreq(size).astype(np.float32)[None, :, None]
    fx = scipy.fft.rfftfreq(size).astype(np.float32)[None, None, :]
    sig = (np.pi * np.broadcast_to(np.asarray(sigma, np.float32), (batch,)))[:, None, None] ** 2
    if anisotropy is None:
        gain = np.exp(-2 * sig * (fy ** 2 + fx ** 2))  # (B, S, S//2+1)
    else:
        c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        a = anisotropy[:, None, None]
        along, across = (fx * c + fy * s) * a, (-fx * s + fy * c) / a
        gain = np.exp(-2 * sig * (along ** 2 + across ** 2))
    shape = (batch, size, size // 2 + 1)
    spectrum = np.empty(shape, np.complex64)
    spectrum.real = rng.random(shape, dtype=np.float32) - 0.5
    spectrum.imag = rng.random(shape, dtype=np.float32) - 0.5
    # unit std from Parseval (no pass over the field): interior columns count twice, uniform(-.5, .5) has var 1/12
    weight = np.full(size // 2 + 1, 2.0, np.float32)
    weight[0] = weight[-1] = 1.0
    std = np.sqrt((gain ** 2 * weight).sum(axis=(1, 2), keepdims=True) / 6) / size ** 2
    spectrum *= gain / std
    field = scipy.fft.irfft2(spectrum, s=(size, size), workers=1)
    return field.astype(np.float32, copy=False)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """A cheap soft step (linear ramp over [-2, 2], clipped): edges of about one pixel need no tanh."""
    x *= 0.25
    x += 0.5
    return np.clip(x, 0.0, 1.0, out=x)


ANGLE_BINS = 360
EOSIN_SHIFT = np.array([0.05, 0.0, 0.3])


def _outline(angle_bin: np.ndarray, amps: np.ndarray, phases: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Relative boundary radius 1 + sum_k a_k cos(k phi + p_k) at each pixel's angle bin (B, S, S).

    Evaluated on a (B, 360) table and gathered: the harmonics cost per angle, not per pixel.
    """
    angles = np.linspace(-np.pi, np.pi, ANGLE_BINS, endpoint=False, dtype=np.float32)
    waves = np.cos(orders[None, :, None] * angles[None, None] + phases[:, :, None])  # (B, K, 360)
    table = 1 + (amps[:, :, None] * waves).sum(axis=1)  # (B, 360)
    b = len(table)
    return np.take_along_axis(table.astype(np.float32), angle_bin.reshape(b, -1), axis=1).reshape(angle_bin.shape)


def _ellipse(dx, dy, theta, a, b, angle: bool = False):
    """Normalised elliptic radius rho (and the angle bin of each pixel); dx/dy (B, S, S), the rest (B,)."""
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    a, b = a[:, None, None], b[:, None, None]
    u = dx * (c / a) + dy * (s / a)  # dx (B, 1, S) and dy (B, S, 1) broadcast to (B, S, S)
    v = dy * (c / b) - dx * (s / b)
    rho = u * u
    rho += v * v
    np.sqrt(rho, out=rho)
    if not angle:
        return rho
    angle_bin = ((np.arctan2(v, u) + np.pi) * (ANGLE_BINS / (2 * np.pi))).astype(np.int32) % ANGLE_BINS
    return rho, angle_bin


# -- the renderer --------------------------------------------------------------

def render(degree: np.ndarray, imposter: np.ndarray, stored: int, patch_size: int,
           rng: np.random.Generator) -> np.ndarray:
    """Render B patches (B, stored, stored, 3) uint8 of cells with true degree `degree` (B,)."""
    b = len(degree)
    scale = patch_size / 64.0
    f32 = np.float32
    m = degree.astype(f32)
    imp = imposter.astype(f32)
    centre = (stored - 1) / 2.0
    grid = np.arange(stored, dtype=f32) - centre
    yy, xx = grid[:, None], grid[None, :]

    # optics: a per-patch Gaussian blur, applied analytically: it widens every edge ramp and
    # low-passes every texture (cheaper than filtering the image, and the same to the eye)
    blur = rng.uniform(0.2, 1.1, b).astype(f32) * scale

    def widths(sharp):  # edge ramp width in pixels for an intrinsic width `sharp` (B,), blurred
        return np.sqrt(sharp ** 2 + (2.0 * blur) ** 2)[:, None, None]

    def textured(sigma):
        return band_noise(rng, b, stored, np.sqrt(sigma ** 2 + blur ** 2))

    # nuisances: size, shape, orientation, position jitter (independent of m)
    r0 = rng.uniform(7.0, 11.0, b).astype(f32) * scale
    elong = np.where(imposter, rng.uniform(1.0, 1.08, b), rng.uniform(1.0, 1.6, b)).astype(f32)
    theta = rng.uniform(0, np.pi, b).astype(f32)
    cx, cy = (rng.uniform(-1.5, 1.5, (2, b)) * scale).astype(f32)
    dx = xx[None] - cx[:, None, None]  # (B, S, S)
    dy = yy[None] - cy[:, None, None]
    rho, angle_bin = _ellipse(dx, dy, theta, r0 * np.sqrt(elong), r0 / np.sqrt(elong), angle=True)

    # outline: a gentle low-order wobble for every nucleus; condensed chromosome arms make it spiky with m
    smooth = np.where(imposter, 0.015, 0.05).astype(f32)
    spiky = (0.32 * m ** 1.2 * (1 - imp)).astype(f32)
    orders = np.array([2, 3, 5, 7, 9, 11, 13], dtype=f32)
    amps = rng.uniform(0.3, 1.0, (b, len(orders))).astype(f32)
    amps[:, :2] *= smooth[:, None]
    amps[:, 2:] *= spiky[:, None] / np.sqrt(len(orders) - 2)
    phases = rng.uniform(0, 2 * np.pi, (b, len(orders))).astype(f32)
    boundary = _outline(angle_bin, amps, phases, orders)
    # condensed chromatin and pyknotic imposters have crisper edges than interphase nuclei
    sharp = np.where(imposter, 1.2, 2.2 - 1.2 * m).astype(f32)
    nucleus = _sigmoid((boundary - rho) * (4 * r0[:, None, None] / widths(sharp)))  # (B, S, S) in [0, 1]

    # chromatin: fine granular + membrane rim + nucleolus (interphase) -> dark clumps with gaps (condensed)
    fine = textured(0.6 * scale)
    coarse = textured(1.5 * scale)
    rim = _sigmoid((rho - 0.72) * 14) * nucleus
    ny, nx = (rng.uniform(-0.35, 0.35, (2, b)) * r0).astype(f32)
    spot = (1.1 * scale) ** 2 + blur ** 2
    nucleolus = np.exp(-((dx - nx[:, None, None]) ** 2 + (dy - ny[:, None, None]) ** 2) / (2 * spot[:, None, None]))
    interphase = 0.5 + 0.2 * fine + 0.35 * rim + 0.45 * nucleolus
    clumps = 0.3 + 1.2 * _sigmoid((coarse + 0.35) * 3.0) + 0.1 * fine
    pyknotic = 1.0 + 0.05 * fine
    mm = (m ** 0.8)[:, None, None]
    texture = np.where(imposter[:, None, None], pyknotic, (1 - mm) * interphase + mm * clumps)
    darkness = np.where(imposter, rng.uniform(1.2, 1.45, b), 0.7 + 0.85 * m).astype(f32)
    stain_h = rng.uniform(0.8, 1.2, b).astype(f32)  # stain strength (nuisance)
    od_h = nucleus * texture * (darkness * stain_h)[:, None, None]

    # cytoplasm: a cell body around the nucleus; it clears and turns granular with m
    cell_r = r0 * rng.uniform(1.7, 2.2, b).astype(f32)
    cell_rho = _ellipse(dx, dy, theta + rng.normal(0, 0.3, b).astype(f32), cell_r * elong ** 0.25,
                        cell_r / elong ** 0.25)
    cell_boundary = _outline(angle_bin, rng.uniform(0, 0.08, (b, 2)).astype(f32),
                             rng.uniform(0, 2 * np.pi, (b, 2)).astype(f32), np.array([2, 3], f32))
    cell = _sigmoid((cell_boundary - cell_rho) * (4 * cell_r[:, None, None] / widths(np.full(b, 2.5, f32))))
    grain = textured(0.5 * scale)
    granularity = (0.08 + 0.45 * m)[:, None, None]
    cyto_e = (0.5 - 0.22 * m)[:, None, None] * np.maximum(1 + granularity * grain, 0.3)

    # stroma: fibrous eosin with pale gaps; the cell membrane is a faint darker line
    fibre = band_noise(rng, b, stored, np.sqrt((1.4 * scale) ** 2 + blur ** 2),
                       anisotropy=rng.uniform(1.2, 2.2, b).astype(f32), angle=rng.uniform(0, np.pi, b).astype(f32))
    stroma_e = rng.uniform(0.18, 0.35, b).astype(f32)[:, None, None] * np.maximum(1.0 + 0.3 * fibre, 0.05)
    membrane = np.exp(-((cell_boundary - cell_rho) * 5) ** 2) * 0.1
    od_e = cell * cyto_e + (1 - cell) * stroma_e + membrane
    od_h = od_h + 0.03 + 0.03 * cell * (1 - nucleus)

    # neighbours: up to three interphase cells whose nuclei are partly in view, merged by the nearest
    depth = np.full((b, stored, stored), -1e3, f32)  # pixels inside the nearest neighbour's nuclear boundary
    for _ in range(3):
        absent = np.where(rng.random(b) < 0.6, 0.0, 1e3).astype(f32)[:, None, None]
        angle = rng.uniform(0, 2 * np.pi, b).astype(f32)
        dist = rng.uniform(0.42, 0.62, b).astype(f32) * stored
        nr = rng.uniform(6.0, 10.0, b).astype(f32) * scale
        ne = rng.uniform(1.0, 1.8, b).astype(f32)
        ndx = dx - (dist * np.cos(angle))[:, None, None]
        ndy = dy - (dist * np.sin(angle))[:, None, None]
        nrho = _ellipse(ndx, ndy, rng.uniform(0, np.pi, b).astype(f32), nr * np.sqrt(ne), nr / np.sqrt(ne))
        nrho -= 1
        nrho *= -nr[:, None, None]
        nrho -= absent
        np.maximum(depth, nrho, out=depth)
    nmask = _sigmoid(depth * (4 / widths(np.full(b, 2.2, f32)))) * (1 - nucleus)
    ntex = 0.55 + 0.2 * fine[:, ::-1] + 0.3 * _sigmoid((3.0 * scale - depth) * 1.5)  # chromatin along the rim
    od_h += nmask * ntex * (rng.uniform(0.6, 1.0, b) * stain_h).astype(f32)[:, None, None]
    od_e += _sigmoid((depth + 6.0 * scale) * 0.5) * (1 - cell) * 0.12

    # stain colour: per-patch perturbed H and E absorption vectors (skimage's Ruifrok-Johnston values)
    from skimage.color import rgb_from_hed

    # eosin leans pink (more blue absorption than skimage's vector) as in typical slide scans
    h_vec = np.abs(rgb_from_hed[0][None] + rng.normal(0, 0.05, (b, 3)))
    e_vec = np.abs(rgb_from_hed[1][None] + EOSIN_SHIFT + rng.normal(0, 0.05, (b, 3)))
    h_vec = (h_vec / np.linalg.norm(h_vec, axis=1, keepdims=True)).astype(f32)
    e_vec = (e_vec / np.linalg.norm(e_vec, axis=1, keepdims=True)).astype(f32)
    e_vec *= rng.uniform(0.75, 1.25, (b, 1)).astype(f32)  # eosin strength
    h_vec *= -np.log(10)  # transmission = 10 ** -OD
    e_vec *= -np.log(10)
    rgb = od_h[..., None] * h_vec[:, None, None, :]  # (B, S, S, 3)
    rgb += od_e[..., None] * e_vec[:, None, None, :]
    np.exp(rgb, out=rgb)
    rgb *= rng.uniform(0.92, 1.0, (b, 1, 1, 3)).astype(f32) * 255  # illumination tint, 8-bit scale

    # sensor noise, uniform (std = amplitude / sqrt(12)); the + 0.5 rounds on the cast to uint8
    amplitude = rng.uniform(0.015, 0.07, b).astype(f32)[:, None, None, None] * 255
    noise = rng.random(rgb.shape, dtype=f32)
    noise *= amplitude
    noise += 0.5 - 0.5 * amplitude
    rgb += noise
    np.clip(rgb, 0, 255, out=rgb)
    return rgb.astype(np.uint8)


def synth_shard(start: int, count: int, seed: int, patch_size: int, margin: int, experts: dict,
                imposter_rate: float = 0.15, batch: int = 32) -> Shard:
    """Make patches start..start+count-1 (one build_dataset job); deterministic in (seed, start)."""
    rng = np.random.default_rng([seed, start])
    panel = Experts(**experts)
    degree, imposter = draw_degree(count, rng, imposter_rate)
    votes = panel.vote(degree, imposter, rng)  # (n, K)
    stored = patch_size + 2 * margin
    images = np.empty((count, stored, stored, 3), np.uint8)
    for lo in range(0, count, batch):
        hi = min(count, lo + batch)
        images[lo:hi] = render(degree[lo:hi], imposter[lo:hi], stored, patch_size, rng)
    soft = votes.mean(axis=1)
    rows = []
    for i in range(count):
        rows.append({
            "id": f"synth-{start + i:07d}",
            "source": "synth",
            "slide": "synth",
            "x": 0,
            "y": 0,
            "label": round(float(soft[i]), 6),
            "votes": ";".join(str(v) for v in votes[i]),
            "hard_label": int(soft[i] >= 0.5),  # majority; ties round half up
            "true_degree": round(float(degree[i]), 6),
            "kind": "imposter" if imposter[i] else "normal",
        })
    return Shard(images, rows)


def synth_jobs(n: int, seed: int, patch_size: int, margin: int, experts: Experts, imposter_rate: float = 0.15,
               chunk: int = 1000) -> list:
    """One build_dataset job per chunk of patches, so chunks render in parallel and resume."""
    return [(f"synth-{start:07d}", synth_shard,
             {"start": start, "count": min(chunk, n - start), "seed": seed, "patch_size": patch_size,
              "margin": margin, "experts": asdict(experts), "imposter_rate": imposter_rate})
            for start in range(0, n, chunk)]
