"""Nuclei detection on an unlabelled slide -> unlabelled patches centred on nuclei.

    mitosis-ldm data detect --slide data/cache/cmu_small_region.svs --out runs/demo/data/cmu [--level 0] [--max N]

Per tile of the slide: haematoxylin channel by scikit-image colour deconvolution
(`rgb2hed`), Gaussian smoothing, an Otsu threshold over tissue pixels,
morphological opening and hole filling; small clusters of touching nuclei are
split by a distance-transform watershed; then `regionprops` keeps regions of
nuclear area, solidity (convex, not ragged fibres) and eccentricity, that are
darker than their surroundings (not fragments of a dark stained structure).
The label is left empty; the split is by y (the bottom 20% of each slide is a
test region that training never sees).

Scale: at 20x (CMU-1-Small-Region, 0.5 um/px) nuclei are 8-25 px across, so a
64x64 patch at level 0 (32 um) holds one nucleus and its neighbourhood, the
same framing as the synthetic benchmark (nucleus radius 7-11 px in 64).
Area limits are given in um^2 and converted with the slide's microns per pixel.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .dataset import Shard
from .slides import open_slide


@dataclass
class DetectConfig:
    """Nucleus detection thresholds (areas in um^2; pixel sizes follow the slide's mpp at the read level)."""

    min_area_um2: float = 10.0     # ~ 3.6 um diameter
    max_area_um2: float = 125.0    # ~ 12.6 um diameter
    min_solidity: float = 0.85
    max_eccentricity: float = 0.95
    min_contrast: float = 0.03     # mean H inside minus the ring around, in OD units
    min_red_minus_green: float = 5.0  # mean R - G inside: rejects green/teal marking dye
    smooth_sigma: float = 1.0      # pixels
    background: float = 220        # mean RGB above this is glass, not tissue
    tile: int = 2048
    default_mpp: float = 0.5       # used when the slide does not say


def find_nuclei(rgb: np.ndarray, cfg: DetectConfig, mpp: float,
                near: tuple[float, float, float] | None = None) -> list[tuple[float, float]]:
    """Nucleus centroids (x, y) in the pixels of `rgb` (H, W, 3).

    `near=(x, y, radius)` keeps only the centroids within `radius` px of (x, y), and saves the shape tests
    (convex hull, moments) of every region whose bounding box lies farther away: a centroid lies inside its
    region's box. The whole window is still segmented, so the nuclei kept are exactly those of a full call.
    """
    from scipy import ndimage as ndi
    from skimage import feature, measure, morphology, segmentation
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu

    tissue = rgb.mean(axis=-1) < cfg.background
    if tissue.sum() < 100:
        return []
    haem = gaussian(rgb2hed(rgb)[..., 0], cfg.smooth_sigma)  # (H, W) haematoxylin optical density
    threshold = threshold_otsu(haem[tissue])
    mask = morphology.opening(haem > threshold, morphology.disk(2)) & tissue
    mask = ndi.binary_fill_holes(mask)
    min_area, max_area = cfg.min_area_um2 / mpp ** 2, cfg.max_area_um2 / mpp ** 2
    labels = measure.label(mask)
    # split clusters of a few touching nuclei; larger blobs are dark structures, not nuclei
    sizes = np.bincount(labels.ravel())
    cluster = (sizes > max_area) & (sizes <= 4 * max_area)
    cluster[0] = False
    if cluster.any():
        in_cluster = cluster[labels]
        distance = ndi.distance_transform_edt(in_cluster)
        radius = max(2, int(np.sqrt(min_area / np.pi)))
        peaks = feature.peak_local_max(distance, min_distance=radius, labels=labels * in_cluster, exclude_border=False)
        markers = np.zeros(labels.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        pieces = segmentation.watershed(-distance, markers, mask=in_cluster)
        labels = np.where(in_cluster, np.where(pieces > 0, pieces + labels.max(), 0), labels)
    centres = []
    for region in measure.regionprops(labels, intensity_image=haem):
        if near is not None:
            y0, x0, y1, x1 = region.bbox  # pixel rows y0..y1-1, columns x0..x1-1
            gap_x, gap_y = max(x0 - near[0], 0, near[0] - (x1 - 1)), max(y0 - near[1], 0, near[1] - (y1 - 1))
            if np.hypot(gap_x, gap_y) > near[2]:
                continue
        if not (min_area <= region.area <= max_area and region.solidity >= cfg.min_solidity
                and region.eccentricity <= cfg.max_eccentricity):
            continue
        y0, x0, y1, x1 = region.bbox
        pad = 4
        ys, xs = slice(max(0, y0 - pad), y1 + pad), slice(max(0, x0 - pad), x1 + pad)
        inside = labels[ys, xs] == region.label
        ring = ndi.binary_dilation(inside, iterations=pad) & ~inside & ~mask[ys, xs]
        if ring.sum() < 5 or region.intensity_mean - haem[ys, xs][ring].mean() < cfg.min_contrast:
            continue
        colour = rgb[ys, xs][inside].mean(axis=0)
        if colour[0] - colour[1] < cfg.min_red_minus_green:  # haematoxylin is purple; marking dye is teal
            continue
        cy, cx = region.centroid
        if near is not None and np.hypot(cx - near[0], cy - near[1]) > near[2]:
            continue
        centres.append((cx, cy))
    return centres


def detect_slide(slide_path: str, patch_size: int, margin: int, level: int, max_patches: int | None,
                 seed: int, cfg: dict, source_name: str) -> Shard:
    """One job: detect nuclei tile by tile over one slide level and cut patches around them."""
    cfg = DetectConfig(**cfg)
    with open_slide(slide_path) as slide:
        width, height = slide.level_size(level)
        scale = slide.level_downsample(level)
        mpp = (slide.mpp or cfg.default_mpp) * scale
        stored = patch_size + 2 * margin
        overlap = stored
        centres = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            for ty in range(0, height, cfg.tile):
                for tx in range(0, width, cfg.tile):
                    x0, y0 = max(0, tx - overlap), max(0, ty - overlap)
                    x1, y1 = min(width, tx + cfg.tile + overlap), min(height, ty + cfg.tile + overlap)
                    rgb = slide._read(x0, y0, x1 - x0, y1 - y0, level)
                    for cx, cy in find_nuclei(rgb, cfg, mpp):
                        gx, gy = cx + x0, cy + y0
                        if tx <= gx < tx + cfg.tile and ty <= gy < ty + cfg.tile:  # each nucleus once
                            centres.append((gx, gy))
        centres = np.array(centres, np.float64).reshape(-1, 2)
        if max_patches is not None and len(centres) > max_patches:
            pick = np.random.default_rng(seed).choice(len(centres), size=max_patches, replace=False)
            centres = centres[np.sort(pick)]
        level0 = [(min(slide.size[0] - 1, int(round(x * scale))), min(slide.size[1] - 1, int(round(y * scale))))
                  for x, y in centres]
        images = slide.read_patches(level0, patch_size, margin, level)
    rows = [{"id": f"{source_name}-{i:06d}", "source": "detect", "slide": source_name, "x": x, "y": y,
             "label": None, "votes": "", "hard_label": None} for i, (x, y) in enumerate(level0)]
    return Shard(images, rows)
