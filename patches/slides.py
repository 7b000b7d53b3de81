"""Reading slides and images: OpenSlide for whole-slide formats, tifffile / PIL for plain images.

    with open_slide("slide.svs") as slide:
        slide.size                                   # (width, height) at level 0
        patches = slide.read_patches(centres, patch_size=64, margin=8)   # (n, 80, 80, 3) uint8

Patch geometry: for a centre (x, y) in level-0 pixels and stored size
S = patch_size + 2 * margin, the window is [x - S//2, x - S//2 + S) (and the same
in y), so the centre pixel lands at index S//2 of the stored patch (the centre of
the inner patch as well). Centres must lie inside the image; windows that cross
the border are padded by reflection (mirror about the edge pixel), never with
black, so rotation augmentations see plausible tissue.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mitosis_ldm.errors import UserError

OPENSLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff"}
PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _short(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"


class Slide:
    """An image with a level-0 size and region reads; subclasses supply `_read`."""

    path: Path
    size: tuple[int, int]   # (width, height) at level 0
    mpp: float | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass

    def level_size(self, level: int) -> tuple[int, int]:
        if level != 0:
            raise UserError(f"{self.path}: field 'level' {level} does not exist (plain images have level 0 only)")
        return self.size

    def level_downsample(self, level: int) -> float:
        self.level_size(level)
        return 1.0

    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        raise NotImplementedError

    def read_level(self, level: int = 0) -> np.ndarray:
        """The whole level as (H, W, 3) uint8."""
        w, h = self.level_size(level)
        return self._read(0, 0, w, h, level)

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """(h, w, 3) uint8 at `level`, top-left (x, y) in that level's pixels; reflection-padded at borders."""
        width, height = self.level_size(level)
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            raise UserError(f"{self.path}: region at ({x}, {y}) size {w}x{h} lies outside the image {width}x{height}")
        if x >= 0 and y >= 0 and x + w <= width and y + h <= height:
            return self._read(x, y, w, h, level)
        cols, rows = _reflect(np.arange(x, x + w), width), _reflect(np.arange(y, y + h), height)
        block = self._read(cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1, level)
        return np.ascontiguousarray(block[(rows - rows.min())[:, None], (cols - cols.min())[None, :]])

    def read_patches(self, centres, patch_size: int, margin: int, level: int = 0) -> np.ndarray:
        """Patches (n, S, S, 3) around level-0 centres [(x, y), ...], read at `level`."""
        stored = patch_size + 2 * margin
        scale = self.level_downsample(level)
        width, height = self.size
        out = np.empty((len(centres), stored, stored, 3), np.uint8)
        for i, (x, y) in enumerate(centres):
            if not (0 <= x < width and 0 <= y < height):
                raise UserError(f"{self.path}: centre ({x}, {y}) lies outside the image {width}x{height}")
            lx, ly = int(round(x / scale)), int(round(y / scale))
            out[i] = self.read_region(lx - stored // 2, ly - stored // 2, stored, stored, level)
        return out


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Mirror indices about the first and last pixel (numpy's 'reflect'), any number of bounces."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded >= size, period - folded, folded)


class OpenSlideSlide(Slide):
    """Whole-slide formats (and tiled TIFFs) through OpenSlide."""

    def __init__(self, path: Path):
        import openslide

        self.path = path
        try:
            self.handle = openslide.OpenSlide(str(path))
        except Exception as err:  # OpenSlideError, OpenSlideUnsupportedFormatError
            raise UserError(f"{path}: cannot read slide ({_short(err)})") from None
        self.size = tuple(self.handle.dimensions)
        mpp = self.handle.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None

    def close(self) -> None:
        self.handle.close()

    def level_size(self, level: int) -> tuple[int, int]:
        if not 0 <= level < self.handle.level_count:
            raise UserError(f"{self.path}: field 'level' {level} does not exist "
                            f"(levels 0..{self.handle.level_count - 1})")
        return tuple(self.handle.level_dimensions[level])

    def level_downsample(self, level: int) -> float:
        self.level_size(level)
        return float(self.handle.level_downsamples[level])

    def _read(self, x, y, w, h, level):
        scale = self.handle.level_downsamples[level]
        try:
            rgba = np.asarray(self.handle.read_region((int(x * scale), int(y * scale)), level, (w, h)))
        except Exception as err:
            raise UserError(f"{self.path}: cannot read region at ({x}, {y}) ({_short(err)})") from None
        # transparent pixels (outside scanned areas) become white, as on glass
        alpha = rgba[..., 3:4].astype(np.uint16)
        return ((rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)


class ArraySlide(Slide):
    """Plain images (PNG, JPEG, strip TIFF): read once, whole, as (H, W, 3) uint8."""

    def __init__(self, path: Path):
        from mitosis_ldm.images import read_image

        self.path = path
        if path.suffix.lower() in {".tif", ".tiff"}:
            _check_tiff(path)
        self.array = read_image(path)
        self.size = (self.array.shape[1], self.array.shape[0])

    def _read(self, x, y, w, h, level):
        return np.ascontiguousarray(self.array[y: y + h, x: x + w])


def _check_tiff(path: Path) -> None:
    """A damaged TIFF can parse into zero pages or an empty array; say so plainly."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            shape = tif.pages[0].shape if len(tif.pages) else ()
    except Exception as err:
        raise UserError(f"{path}: cannot read image (corrupt TIFF: {_short(err)})") from None
    if not shape or 0 in shape:
        raise UserError(f"{path}: cannot read image (corrupt TIFF: no image data)")


def open_slide(path) -> Slide:
    """Open a slide or image by content: OpenSlide when it recognises the file, else a plain image reader."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: slide file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a slide or image file")
    suffix = path.suffix.lower()
    if suffix not in OPENSLIDE_SUFFIXES | PLAIN_SUFFIXES:
        raise UserError(f"{path}: unsupported slide format '{suffix}' "
                        f"(OpenSlide formats {', '.join(sorted(OPENSLIDE_SUFFIXES))} or PNG/JPEG/BMP)")
    if suffix in OPENSLIDE_SUFFIXES:
        import openslide

        try:
            vendor = openslide.OpenSlide.detect_format(str(path))
        except Exception:
            vendor = None
        if vendor is not None:
            return OpenSlideSlide(path)
        if suffix not in PLAIN_SUFFIXES:
            raise UserError(f"{path}: cannot read slide (OpenSlide does not recognise the file; corrupt?)")
    return ArraySlide(path)


def find_slide(folder: Path, name: str, flag: str = "--slides") -> Path:
    """Resolve a slide file name against a folder; a missing slide is a clear error naming both."""
    path = Path(name)
    if not path.is_absolute():
        path = Path(folder) / name
    if not path.exists():
        raise UserError(f"{path}: slide file not found (listed in the annotations; looked in {flag} {folder})")
    return path
