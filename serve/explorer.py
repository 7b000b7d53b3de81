"""What the explorer computes: the nucleus under a click, its transition, scores, features and exports.

    explorer = Explorer(slides, datasets, pipeline, classifier, exports="runs/serve/exports")
    nucleus = explorer.nucleus("cmu_small_region.svs", 1040, 620)       # patch + ensemble score
    result = explorer.transition(explorer.source(request), explorer.settings(request))

The click is re-centred on the nearest nucleus found by the detector `data detect`
uses (patches/detect.py), in a window around it. Transitions are rendered by
`diffusion.real2gen.render` (the same call as `mitosis-ldm real2gen`), scored
by the classifier ensemble (mean +- std over members) and measured with
report/morphology.py. Results are cached by (patch hash, own label, settings), so
a repeated request (a slider drag, an export) costs no model call.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shlex
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mitosis_ldm.errors import UserError
from mitosis_ldm.label_groups import group_soft_labels
from serve.tiles import NotFound, SlideRegistry

DEFAULT_CONDITIONS = tuple(np.linspace(0, 1, 11).round(6).tolist())
MAX_CONDITIONS = 21
# A first render in about a second on 2 cores: 8 DDIM steps instead of real2gen's 20, started at the same
# noise level (strength rescaled, `same_start`). On 24 demo CMU nuclei the ensemble's score rises by 0.51
# from the y = 0 to the y = 1 frame, against 0.54 at 20 steps; 10 steps at the unscaled strength 0.8 gave
# 0.44 (fewer steps on the same strength start at less noise and edit less). One fixed-point iteration per
# inverted step instead of real2gen's 3: on the demo model it reconstructs real nuclei within 0.001 dB of 3.
# A request can ask for more of either.
DEFAULT_STEPS = 8
DEFAULT_INVERSION_ITERS = 1
REFERENCE_STEPS = 20  # the steps `mitosis-ldm real2gen` takes by default
MAX_STEPS = 100
MAX_GUIDANCE = 30.0


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def _finite_or_none(values) -> list:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in values]


@contextmanager
def torch_threads(count: int):
    """Run the block on `count` torch threads (at most the current number), then restore it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(count, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def same_start(strength: float, steps: int, new_steps: int) -> float:
    """The strength at which a `new_steps` DDIM inversion stops at the same noise level (the largest grid
    timestep not above it) as one of `steps` at `strength`; the grids are the pipeline's "leading" ones."""
    from diffusion.schedulers import run_steps

    top = (run_steps(steps, strength) - 1) / steps  # the highest timestep reached, as a fraction of T
    reached = sum(1 for i in range(new_steps) if i / new_steps <= top + 1e-9)
    return reached / new_steps


@dataclass(frozen=True)
class Settings:
    """How a transition is rendered; part of the cache key and of every export."""

    conditions: tuple[float, ...]
    mode: str
    strength: float
    guidance: float
    steps: int
    inversion_iters: int = DEFAULT_INVERSION_ITERS


@dataclass
class Source:
    """The real patch a transition starts from: a re-centred slide nucleus or a dataset patch."""

    patch: np.ndarray          # uint8 (S, S, 3) at the pipeline's patch size
    own_label: float           # NaN = unlabelled -> the null label (as real2gen does)
    describe: dict             # where it came from (slide + click + centre, or dataset + id)
    real2gen_input: str | None = None  # `--input` for `mitosis-ldm real2gen` when it exists already

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.patch.tobytes()).hexdigest()


class LRU:
    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def __len__(self) -> int:
        return len(self.items)


class Explorer:
    """Slides + datasets + pipeline + classifier, and the caches in front of them."""

    def __init__(self, slides: SlideRegistry, datasets: dict, pipeline, classifier, exports,
                 pipeline_path: str = "", classifier_path: str = "", render_fn=None, cache_size: int = 128,
                 trace: bool = True):
        from diffusion.real2gen import render
        from diffusion.traced import trace_pipeline

        self.slides, self.datasets = slides, datasets
        self.pipeline, self.classifier = pipeline, classifier
        self.pipeline_path, self.classifier_path = str(pipeline_path), str(classifier_path)
        self.exports = Path(exports)
        self.render_fn = render_fn or render
        # frozen graphs of the UNet, decoder and encoder: the same frames; bench/serve_latency.py measured a first
        # render 1.24-1.40x faster at p50 than `serve --eager` (traced.py)
        self.eager_reason = trace_pipeline(pipeline) if trace and render_fn is None else "not asked"
        self.patch_size = int(pipeline.image_shape[0])
        if int(classifier.patch_size) > self.patch_size:
            raise UserError(f"--classifier: scores {classifier.patch_size}px patches but the pipeline renders "
                            f"{self.patch_size}px ones; use a classifier trained on patches of at most that size")
        self.transitions = LRU(cache_size)
        self.nuclei = LRU(4 * cache_size)

    # -- defaults ---------------------------------------------------------------------------------------
    def defaults(self, mode: str = "invert") -> dict:
        """The settings a request leaves out, from the pipeline (the same defaults as `mitosis-ldm real2gen`)."""
        info = self.pipeline.info
        guidance = float(info.get("default_real2gen_guidance", self.pipeline.default_guidance))
        strength = same_start(float(info.get("default_real2gen_strength", 1.0)), REFERENCE_STEPS, DEFAULT_STEPS) \
            if mode == "invert" else 0.5
        return {"conditions": list(DEFAULT_CONDITIONS), "mode": mode, "strength": strength, "guidance": guidance,
                "steps": DEFAULT_STEPS, "inversion_iters": DEFAULT_INVERSION_ITERS}

    def settings(self, conditions=None, mode: str = "invert", strength=None, guidance=None, steps=None,
                 inversion_iters=None) -> Settings:
        base = self.defaults(mode)
        conditions = base["conditions"] if conditions is None else conditions
        if isinstance(conditions, str):
            from diffusion.sampling_args import parse_conditions

            conditions = parse_conditions(conditions)
        if not 1 <= len(conditions) <= MAX_CONDITIONS:
            raise UserError(f"field 'conditions': give 1 to {MAX_CONDITIONS} labels, got {len(conditions)}")
        for c in conditions:
            if not 0.0 <= float(c) <= 1.0:
                raise UserError(f"field 'conditions': label {c} is outside [0, 1]")
        strength = base["strength"] if strength is None else float(strength)
        guidance = base["guidance"] if guidance is None else float(guidance)
        steps = base["steps"] if steps is None else int(steps)
        iters = base["inversion_iters"] if inversion_iters is None else int(inversion_iters)
        if not 0.0 < strength <= 1.0:
            raise UserError(f"field 'strength': must be in (0, 1], got {strength:g}")
        if not 0.0 <= guidance <= MAX_GUIDANCE:
            raise UserError(f"field 'guidance': must be in [0, {MAX_GUIDANCE:g}], got {guidance:g}")
        if not 1 <= steps <= MAX_STEPS:
            raise UserError(f"field 'steps': must be in [1, {MAX_STEPS}], got {steps}")
        from diffusion.sampling_args import MAX_INVERSION_ITERS

        if not 0 <= iters <= MAX_INVERSION_ITERS:
            raise UserError(f"field 'inversion_iters': must be in [0, {MAX_INVERSION_ITERS}], got {iters}")
        return Settings(tuple(round(float(c), 6) for c in conditions), mode, strength, guidance, steps, iters)

    # -- scoring ----------------------------------------------------------------------------------------
    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ensemble mean and std over members per image (N,), on the classifier's centre crop."""
        from classifier.model import fit_size

        size = int(self.classifier.patch_size)
        crops = np.stack([fit_size(im, size) for im in images])
        members = np.asarray(self.classifier.predict(crops), float)  # (N, K)
        return members.mean(1), members.std(1)

    # -- slides -----------------------------------------------------------------------------------------
    def check_point(self, slide: str, x: float, y: float):
        entry = self.slides.get(slide)
        width, height = entry.size
        if not (0 <= x < width):
            raise UserError(f"field 'x': {x:g} lies outside slide '{slide}' (0 <= x < {width})")
        if not (0 <= y < height):
            raise UserError(f"field 'y': {y:g} lies outside slide '{slide}' (0 <= y < {height})")
        return entry, int(x), int(y)

    def locate(self, slide: str, x: float, y: float) -> dict:
        """The nucleus nearest a click (level-0 px): centre, patch and whether the detector found one."""
        entry, x, y = self.check_point(slide, x, y)
        key = (slide, x, y)
        found = self.nuclei.get(key)
        if found is not None:
            return found
        from patches.detect import DetectConfig, find_nuclei

        cfg = DetectConfig()
        half = max(64, self.patch_size)
        window = entry.slide.read_region(x - half, y - half, 2 * half, 2 * half)  # (2h, 2h, 3), reflected at borders
        width, height = entry.size
        best = None
        # only nuclei within half a patch of the click (the window's centre) come back
        for cx, cy in find_nuclei(window, cfg, entry.slide.mpp or cfg.default_mpp,
                                  near=(half, half, self.patch_size / 2)):
            gx, gy = x - half + cx, y - half + cy
            dist = float(np.hypot(gx - x, gy - y))
            if 0 <= gx < width and 0 <= gy < height and (best is None or dist < best[2]):
                best = (gx, gy, dist)
        cx, cy = (int(round(best[0])), int(round(best[1]))) if best else (x, y)
        patch = entry.slide.read_patches([(cx, cy)], self.patch_size, 0)[0]
        found = {"centre": [cx, cy], "detected": best is not None, "distance": round(best[2], 2) if best else None,
                 "patch": patch}
        self.nuclei.put(key, found)
        return found

    def nucleus(self, slide: str, x: float, y: float) -> dict:
        found = self.locate(slide, x, y)
        mean, std = self.score(found["patch"][None])
        return {"slide": slide, "click": [int(x), int(y)], "centre": found["centre"], "detected": found["detected"],
                "distance": found["distance"], "patch": data_uri(found["patch"]), "size": self.patch_size,
                "score": round(float(mean[0]), 5), "score_std": round(float(std[0]), 5)}

    # -- sources ----------------------------------------------------------------------------------------
    def slide_source(self, slide: str, x: float, y: float) -> Source:
        found = self.locate(slide, x, y)
        return Source(found["patch"], float("nan"), {"slide": slide, "click": [int(x), int(y)],
                                                     "centre": found["centre"], "detected": found["detected"]})

    def dataset_source(self, name: str, index: int) -> Source:
        entry = self.datasets.get(name)
        if entry is None:
            raise NotFound(f"dataset '{name[:80]}' is not served")
        path, ds = entry
        if not 0 <= index < len(ds):
            raise UserError(f"field 'index': dataset '{name}' has patches 0..{len(ds) - 1}, got {index}")
        if ds.patch_size != self.patch_size:
            raise UserError(f"dataset '{name}': patches are {ds.patch_size}px but the pipeline renders "
                            f"{self.patch_size}px")
        pid = ds.ids()[index]
        return Source(ds.uint8(np.array([index]))[0], float(ds.soft_labels[index]),
                      {"dataset": name, "index": index, "id": pid}, real2gen_input=f"{path}:{pid}")

    # -- transitions ------------------------------------------------------------------------------------
    def cache_key(self, source: Source, settings: Settings) -> str:
        text = json.dumps([source.digest, None if np.isnan(source.own_label) else source.own_label,
                           asdict(settings)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def cached(self, source: Source, settings: Settings) -> dict | None:
        return self.transitions.get(self.cache_key(source, settings))

    def transition(self, source: Source, settings: Settings) -> dict:
        """Render, score and measure (a model call: run it on the worker); the answer is cached."""
        from report.morphology import measure_batch

        key = self.cache_key(source, settings)
        hit = self.transitions.get(key)
        if hit is not None:
            return hit
        out = self.render_fn(self.pipeline, images=source.patch[None],
                             own_labels=np.array([source.own_label], np.float32),
                             conditions=list(settings.conditions), mode=settings.mode, guidance=settings.guidance,
                             steps=settings.steps, strength=settings.strength, reconstruct=False,
                             inversion_iters=settings.inversion_iters)
        frames = np.asarray(out["frames"][0], np.uint8)  # (K, S, S, 3)
        # morphology and PNG encoding (scikit-image, zlib) overlap the ensemble's scoring (torch), each on a core
        # of its own: two torch threads beside the measuring thread oversubscribe two cores, and the pair took
        # 130 ms against 80 ms this way (20 demo nuclei)
        with ThreadPoolExecutor(1) as side, torch_threads(1):
            measured = side.submit(lambda: (measure_batch(frames), [data_uri(f) for f in frames]))
            mean, std = self.score(np.concatenate([source.patch[None], frames]))
            features, uris = measured.result()
        result = {
            "key": key, "source": source.describe, "settings": asdict(settings),
            "input": data_uri(source.patch), "input_score": round(float(mean[0]), 5),
            "input_score_std": round(float(std[0]), 5),
            "frames": uris,
            "scores": _finite_or_none(mean[1:]), "scores_std": _finite_or_none(std[1:]),
            "features": {name: _finite_or_none(v) for name, v in features.items()},
            "_frames": frames, "_source": source,
        }
        self.transitions.put(key, result)
        return result

    # -- export -----------------------------------------------------------------------------------------
    def export(self, result: dict) -> dict:
        """The strip PNG, the input patch and a JSON of the settings with the `mitosis-ldm real2gen` command."""
        from mitosis_ldm.images import save_png, strip
        from mitosis_ldm.io import write_json

        source: Source = result["_source"]
        settings = result["settings"]
        tag = source.describe.get("slide") or source.describe.get("dataset")
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(tag).stem)[:40] + "-" + result["key"][:12]
        self.exports.mkdir(parents=True, exist_ok=True)
        frames = np.concatenate([source.patch[None], result["_frames"]])
        captions = ["input"] + [f"y={c:g}" for c in settings["conditions"]]
        save_png(self.exports / f"{stem}.png", strip(frames, captions, scale=2))
        real2gen_input = source.real2gen_input
        if real2gen_input is None:
            save_png(self.exports / f"{stem}-input.png", source.patch)
            real2gen_input = str(self.exports / f"{stem}-input.png")
        command = ["mitosis-ldm", "real2gen", "--pipeline", self.pipeline_path, "--input", real2gen_input,
                   "--conditions", ",".join(f"{c:g}" for c in settings["conditions"]), "--mode", settings["mode"],
                   "--strength", f"{settings['strength']:g}", "--guidance", f"{settings['guidance']:g}",
                   "--steps", str(settings["steps"]), "--inversion-iters", str(settings["inversion_iters"]),
                   "--out", str(self.exports / f"{stem}-real2gen")]
        write_json(self.exports / f"{stem}.json", {
            "source": source.describe, "settings": settings, "pipeline": self.pipeline_path,
            "classifier": self.classifier_path, "model_hash": getattr(self.pipeline, "model_hash", None),
            "input": real2gen_input, "scores": result["scores"], "scores_std": result["scores_std"],
            "input_score": result["input_score"], "features": result["features"],
            "strip": str(self.exports / f"{stem}.png"), "command": shlex.join(command),
        })
        return {"png": f"/exports/{stem}.png", "json": f"/exports/{stem}.json", "folder": str(self.exports),
                "command": shlex.join(command)}

    def export_file(self, name: str) -> Path:
        """A file this explorer wrote into the exports folder; anything else is NotFound."""
        if "/" in name or "\\" in name or name.startswith(".") or not name.endswith((".png", ".json")):
            raise NotFound(f"export '{name[:80]}' is not served")
        path = self.exports / name
        if not path.is_file():
            raise NotFound(f"export '{name[:80]}' is not served")
        return path

    # -- datasets ---------------------------------------------------------------------------------------
    def dataset_grid(self, name: str, per_bin: int = 24) -> dict:
        """Patches grouped by soft label (its distinct values when few, else five bins), evenly picked."""
        entry = self.datasets.get(name)
        if entry is None:
            raise NotFound(f"dataset '{name[:80]}' is not served")
        _, ds = entry
        soft = np.asarray(ds.soft_labels, float)
        index, described = group_soft_labels(soft, max_distinct=6, bins=5)
        titles = [f"label {g:g}" if isinstance(g, float) else f"label {g[0]:.1f}-{g[1]:.1f}" for g in described]
        groups = [(title, index == k) for k, title in enumerate(titles)] + [("unlabelled", index < 0)]
        bins = []
        ids = ds.ids()
        for title, mask in groups:
            members = np.flatnonzero(mask)
            if not len(members):
                continue
            pick = members[np.unique(np.linspace(0, len(members) - 1, min(per_bin, len(members))).round().astype(int))]
            bins.append({"title": title, "count": int(len(members)),
                         "items": [{"index": int(i), "id": ids[i],
                                    "label": None if not np.isfinite(soft[i]) else round(float(soft[i]), 4),
                                    "thumb": f"/datasets/{name}/patch/{int(i)}.png"} for i in pick]})
        return {"name": name, "patches": len(ds), "patch_size": ds.patch_size, "bins": bins}

    def dataset_patch(self, name: str, index: int) -> bytes:
        entry = self.datasets.get(name)
        if entry is None:
            raise NotFound(f"dataset '{name[:80]}' is not served")
        ds = entry[1]
        if not 0 <= index < len(ds):
            raise NotFound(f"dataset '{name}' has no patch {index}")
        return png_bytes(ds.uint8(np.array([index]))[0])
