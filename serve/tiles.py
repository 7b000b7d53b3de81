"""The slides the explorer may show, and their Deep Zoom tiles.

    slides = SlideRegistry(["data/cache/cmu_small_region.svs", "more_slides/"])
    slides.dzi("cmu_small_region.svs")            # the .dzi XML OpenSeadragon opens
    slides.tile("cmu_small_region.svs", 12, 3, 4)  # JPEG bytes

Whole-slide formats are tiled by `openslide.deepzoom.DeepZoomGenerator` over the
OpenSlide handle; plain PNG/JPEG/TIFF images go through `openslide.ImageSlide`, so
both take the same path. Regions for the models are read with `patches.slides`
(reflection padding at the borders, as `data detect` cuts its patches). A slide is
known by its file name; nothing outside the files and folders given at start is
ever opened.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from mitosis_ldm.errors import UserError
from patches.slides import OPENSLIDE_SUFFIXES, PLAIN_SUFFIXES, ArraySlide, OpenSlideSlide, Slide, open_slide

TILE_SIZE = 254
OVERLAP = 1
TILE_FORMAT = "jpeg"


class NotFound(Exception):
    """A slide, dataset, tile or file the explorer does not serve (answered with 404)."""


@dataclass
class SlideEntry:
    name: str
    path: Path
    slide: Slide
    deepzoom: object                              # openslide.deepzoom.DeepZoomGenerator
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def size(self) -> tuple[int, int]:
        return self.slide.size

    def describe(self) -> dict:
        return {"name": self.name, "width": self.size[0], "height": self.size[1], "mpp": self.slide.mpp,
                "dzi": f"/slides/{self.name}.dzi"}


def slide_files(inputs: list[str]) -> list[Path]:
    """Expand files and folders (one level, sorted) into slide files; an unusable input is a UserError."""
    suffixes = OPENSLIDE_SUFFIXES | PLAIN_SUFFIXES
    files = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise UserError(f"--slides: folder {path} holds no slides ({', '.join(sorted(suffixes))})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"--slides: {path} not found")
    return files


class SlideRegistry:
    """Name -> open slide + tiler; a small LRU of encoded tiles makes a revisited tile free."""

    def __init__(self, inputs: list[str], tile_cache: int = 1024):
        import openslide
        from openslide.deepzoom import DeepZoomGenerator
        from PIL import Image

        self.entries: dict[str, SlideEntry] = {}
        for path in slide_files(inputs):
            if path.name in self.entries:
                raise UserError(f"--slides: two slides are named {path.name} ({self.entries[path.name].path} and "
                                f"{path}); slides are addressed by file name")
            slide = open_slide(path)
            if isinstance(slide, OpenSlideSlide):
                handle = slide.handle
            elif isinstance(slide, ArraySlide):
                handle = openslide.ImageSlide(Image.fromarray(slide.array))
            else:  # pragma: no cover - open_slide returns one of the two
                raise UserError(f"{path}: unsupported slide")
            tiler = DeepZoomGenerator(handle, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)
            self.entries[path.name] = SlideEntry(path.name, path, slide, tiler)
        self._tiles: OrderedDict = OrderedDict()
        self._tile_cache = tile_cache
        self._cache_lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> SlideEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise NotFound(f"slide '{name[:80]}' is not served")
        return entry

    def dzi(self, name: str) -> str:
        return self.get(name).deepzoom.get_dzi(TILE_FORMAT)

    def tile(self, name: str, level: int, col: int, row: int) -> bytes:
        key = (name, level, col, row)
        with self._cache_lock:
            if key in self._tiles:
                self._tiles.move_to_end(key)
                return self._tiles[key]
        entry = self.get(name)
        tiler = entry.deepzoom
        if not 0 <= level < tiler.level_count:
            raise NotFound(f"slide '{name}' has no level {level} (0..{tiler.level_count - 1})")
        cols, rows = tiler.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise NotFound(f"slide '{name}' level {level} has no tile {col}_{row} ({cols}x{rows} tiles)")
        with entry.lock:  # ImageSlide crops one shared PIL image; OpenSlide is thread-safe but cheap to serialise
            image = tiler.get_tile(level, (col, row))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        with self._cache_lock:
            self._tiles[key] = data
            while len(self._tiles) > self._tile_cache:
                self._tiles.popitem(last=False)
        return data

    def close(self) -> None:
        for entry in self.entries.values():
            entry.slide.close()
