"""Nucleus morphology with scikit-image: segment on the haematoxylin channel, then measure.

    features = measure_batch(images)   # uint8 (N, H, W, 3) -> {name: (N,) float}

The nucleus is the Otsu-thresholded, lightly smoothed haematoxylin density
(colour deconvolution, `rgb2hed`) component at the patch centre. A patch where
no nucleus can be found gets NaN features, which every aggregate skips.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2gray, rgb2hed
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import regionprops
from skimage.morphology import disk

# name -> what it measures (the report shows these as axis labels)
FEATURES = {
    "area": "nucleus area (px²)",
    "perimeter": "nucleus perimeter (px)",
    "solidity": "solidity (area / convex area)",
    "irregularity": "outline irregularity (perimeter / circle's − 1)",
    "eccentricity": "eccentricity",
    "h_mean": "mean haematoxylin density (darkness)",
    "h_max": "max haematoxylin density",
    "contrast": "nucleus–cytoplasm contrast (grey)",
    "granularity": "cytoplasm granularity (high-pass std)",
}
# the features the issue asks to be monotone in the condition
KEY_FEATURES = ("h_mean", "irregularity")


def segment_nucleus(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask (H, W) bool of the central nucleus, haematoxylin density (H, W)) for one uint8 RGB patch."""
    # floor the transmission at 4/255 (optical density ~1.8, where scanners saturate): a channel at 0
    # would send a near-black chromatin pixel's whole density to eosin instead of haematoxylin
    hed = rgb2hed(np.maximum(image, 4))                # (H, W, 3) stain densities
    density = gaussian(hed[..., 0], sigma=1.0)         # smoothing keeps chromatin clumps in one region
    h, w = density.shape
    if np.ptp(density) <= 1e-6:
        return np.zeros((h, w), bool), density
    mask = ndi.binary_opening(density > threshold_otsu(density), structure=disk(1))
    regions, count = ndi.label(mask, structure=np.ones((3, 3)))  # 8-connected, as skimage's `label`
    if count == 0:
        return np.zeros((h, w), bool), density
    index = np.arange(1, count + 1)
    near = np.asarray(ndi.minimum(_centre_distance(h, w), regions, index))  # each region's pixel nearest the centre
    area = np.bincount(regions.ravel(), minlength=count + 1)[1:]
    best, best_key = 0, None
    for number, region_near, region_area in zip(index, near, area):
        # prefer regions touching the central eighth, then the larger one; else the nearest
        far = region_near > h / 8
        key = (far, region_near if far else -region_area)
        if best_key is None or key < best_key:
            best, best_key = number, key
    return ndi.binary_fill_holes(regions == best), density


@lru_cache(maxsize=8)
def _centre_distance(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    distance = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    distance.flags.writeable = False
    return distance


def measure(image: np.ndarray) -> dict[str, float]:
    """All FEATURES of one uint8 (H, W, 3) patch."""
    mask, density = segment_nucleus(image)
    if mask.sum() < 4:
        return {name: float("nan") for name in FEATURES}
    props = regionprops(mask.astype(np.uint8))[0]
    area, perimeter = float(props.area), float(props.perimeter)
    grey = rgb2gray(image)                             # (H, W) in [0, 1]
    # the pixels within r of the nucleus: a dilation by disk(r), from the exact Euclidean distance transform
    # (a 13x13 binary dilation cost as much as the rest of the measurement)
    ring = (ndi.distance_transform_edt(~mask) <= max(2, image.shape[0] // 10)) & ~mask
    if ring.sum() == 0:
        ring = ~mask
    high_pass = grey - gaussian(grey, sigma=1.5)       # granules are a few pixels across
    return {
        "area": area,
        "perimeter": perimeter,
        "solidity": float(props.solidity),
        "irregularity": perimeter / (2 * np.sqrt(np.pi * area)) - 1.0,
        "eccentricity": float(props.eccentricity),
        "h_mean": float(density[mask].mean()),
        "h_max": float(density[mask].max()),
        "contrast": float(grey[ring].mean() - grey[mask].mean()),
        "granularity": float(high_pass[ring].std()),
    }


def measure_batch(images: np.ndarray) -> dict[str, np.ndarray]:
    """FEATURES over uint8 (N, H, W, 3): {name: (N,)}."""
    rows = [measure(np.asarray(img)) for img in images]
    return {name: np.array([r[name] for r in rows], float) for name in FEATURES}


def label_bins(labels: np.ndarray, edges) -> np.ndarray:
    """Bin index per label (edges ascending, last bin closed); -1 for NaN labels."""
    labels = np.asarray(labels, float)
    edges = np.asarray(edges, float)
    index = np.clip(np.searchsorted(edges, labels, side="right") - 1, 0, len(edges) - 2)
    return np.where(np.isfinite(labels), index, -1)
