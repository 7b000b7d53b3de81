"""Image files in and out: RGB reading with clear errors, atomic PNGs, strips and contact sheets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import UserError
from .io import atomic_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def read_image(path) -> np.ndarray:
    """Read an RGB image as uint8 (H, W, 3). Grey or multi-channel images are refused."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    try:
        if path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            array = tifffile.imread(path)
        else:
            with Image.open(path) as img:
                img.load()
                array = np.asarray(img)
    except Exception as err:  # PIL and tifffile raise many types for corrupt files
        reason = ' '.join(str(err).split())[:120]
        raise UserError(f"{path}: cannot read image ({type(err).__name__}: {reason})") from None
    if array.ndim == 3 and array.shape[-1] == 4 and array.dtype == np.uint8 and (array[..., 3] == 255).all():
        array = array[..., :3]
    if array.ndim != 3 or array.shape[-1] != 3:
        channels = 1 if array.ndim == 2 else array.shape[-1]
        raise UserError(f"{path}: expected an RGB image with 3 channels, got {channels} (shape {array.shape})")
    if array.dtype != np.uint8:
        raise UserError(f"{path}: expected 8-bit pixels, got {array.dtype}")
    return np.ascontiguousarray(array)


def save_png(path, array: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) or (H, W) array as PNG, atomically."""
    img = Image.fromarray(np.asarray(array, dtype=np.uint8))
    with atomic_file(path, "wb") as handle:
        img.save(handle, format="PNG")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow
        return ImageFont.load_default()


def strip(frames: np.ndarray, captions: list[str] | None = None, scale: int = 2, gap: int = 2) -> np.ndarray:
    """Frames (C, H, W, 3) side by side, upscaled, with a caption under each."""
    frames = np.asarray(frames, dtype=np.uint8)
    c, h, w, _ = frames.shape
    cap_h = 14 if captions else 0
    out = np.full((h * scale + cap_h, c * (w * scale + gap) - gap, 3), 255, np.uint8)
    for i in range(c):
        big = frames[i].repeat(scale, 0).repeat(scale, 1)
        out[: h * scale, i * (w * scale + gap): i * (w * scale + gap) + w * scale] = big
    if captions:
        img = Image.fromarray(out)
        draw = ImageDraw.Draw(img)
        font = _font(11)
        for i, text in enumerate(captions):
            draw.text((i * (w * scale + gap) + 2, h * scale + 1), str(text), fill=(0, 0, 0), font=font)
        out = np.asarray(img)
    return out


def contact_sheet(images: np.ndarray, captions: list[str] | None = None, ncols: int = 16,
                  scale: int = 1, gap: int = 2) -> np.ndarray:
    """A grid of uint8 (N, H, W, 3) images, each optionally captioned underneath."""
    images = np.asarray(images, dtype=np.uint8)
    n = len(images)
    if n == 0:
        return np.full((8, 8, 3), 255, np.uint8)
    ncols = max(1, min(ncols, n))
    rows = [images[i: i + ncols] for i in range(0, n, ncols)]
    row_caps = [captions[i: i + ncols] if captions else None for i in range(0, n, ncols)]
    strips = []
    for frames, caps in zip(rows, row_caps):
        s = strip(frames, caps, scale=scale, gap=gap)
        pad = np.full((s.shape[0] + gap, ncols * (images.shape[2] * scale + gap) - gap, 3), 255, np.uint8)
        pad[: s.shape[0], : s.shape[1]] = s
        strips.append(pad)
    return np.concatenate(strips, axis=0)
