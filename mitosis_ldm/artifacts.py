"""The artifacts stages exchange on disk, how to recognise them, and the transitions folder.

Every artifact folder carries a marker so that passing the wrong folder gives
one clear line ("is an autoencoder folder, expected a classifier folder"):

| kind         | marker                                                        |
|--------------|---------------------------------------------------------------|
| patches      | dataset.json {"format": "mitosis-ldm/patches"} + patches.npy  |
| autoencoder  | config.json {"_class_name": "AutoencoderKL"}                  |
| classifier   | config.json {"format": "mitosis-ldm/classifier"}              |
| pipeline     | pipeline.json {"format": "mitosis-ldm/pipeline"}              |
| latents      | cache.json {"format": "mitosis-ldm/latents"}                  |
| transitions  | manifest.json {"format": "mitosis-ldm/transitions"}           |

Transitions folder (written by `diffusion`, scored by `classifier`, read by `report`):
- `frames.npy` uint8 (S seeds, C columns, H, W, 3);
- `manifest.json`: format, kind ("transition" | "real2gen"), seeds (S ints),
  conditions (C floats; for real2gen column 0 is the real input and its entry
  is the input's own label or null), has_input_frame, guidance, sampler, steps,
  model_hash, plus anything the writer adds;
- `strip-{seed}.png` one strip per seed, conditions written under the frames;
- after scoring: `scores.csv` with columns name, seed, frame, condition, mean,
  std, member_0 … member_{K-1} (one row per frame, seed-major), and later
  `metrics.json`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import integrity
from .errors import UserError
from .io import atomic_dir, read_npy, save_npy, write_json

PATCHES = "patches"
AUTOENCODER = "autoencoder"
CLASSIFIER = "classifier"
PIPELINE = "pipeline"
LATENTS = "latents"
TRANSITIONS = "transitions"

FORMAT = {
    PATCHES: "mitosis-ldm/patches",
    CLASSIFIER: "mitosis-ldm/classifier",
    PIPELINE: "mitosis-ldm/pipeline",
    LATENTS: "mitosis-ldm/latents",
    TRANSITIONS: "mitosis-ldm/transitions",
}
MARKER_FILE = {
    PATCHES: "dataset.json",
    CLASSIFIER: "config.json",
    PIPELINE: "pipeline.json",
    LATENTS: "cache.json",
    TRANSITIONS: "manifest.json",
}
DESCRIPTION = {
    PATCHES: "a patch dataset folder",
    AUTOENCODER: "an autoencoder folder",
    CLASSIFIER: "a classifier folder",
    PIPELINE: "a diffusion pipeline folder",
    LATENTS: "a latent cache folder",
    TRANSITIONS: "a transitions folder",
}


def _read_marker(path: Path) -> dict | None:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def artifact_kind(path) -> str | None:
    """Which artifact a folder holds, or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    for kind in (PATCHES, PIPELINE, LATENTS, TRANSITIONS):
        marker = _read_marker(path / MARKER_FILE[kind])
        if marker and marker.get("format") == FORMAT[kind]:
            return kind
    config = _read_marker(path / "config.json")
    if config:
        if config.get("format") == FORMAT[CLASSIFIER]:
            return CLASSIFIER
        if config.get("_class_name") == "AutoencoderKL":
            return AUTOENCODER
    if (path / "model" / "config.json").exists() or (path / "model" / "pipeline.json").exists():
        return "run"
    return None


def expect_artifact(path, kind: str, flag: str) -> Path:
    """Check that `path` holds artifact `kind` and its recorded hashes hold; otherwise one line naming the problem."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found ({flag} expects {DESCRIPTION[kind]})")
    found = artifact_kind(path)
    if found == kind:
        integrity.verify(path)  # sizes and small files' hashes; everything under --verify
        return path
    if found == "run":
        inner = path / "model"
        if artifact_kind(inner) == kind:
            integrity.verify(inner)
            return inner
        found = artifact_kind(inner)
    if found is None:
        raise UserError(f"{path}: is not {DESCRIPTION[kind]} ({flag}); its marker file "
                        f"{MARKER_FILE.get(kind, 'config.json')} is missing or unreadable")
    raise UserError(f"{path}: is {DESCRIPTION[found]}, but {flag} expects {DESCRIPTION[kind]}")


def load_part(folder, what: str, load):
    """Run `load(folder)` (a `from_pretrained`); any failure is one line naming the folder and the part.

    Truncated safetensors, config files that are not JSON, and config fields of the wrong type or that
    contradict each other surface from diffusers/safetensors/torch as many exception types.
    """
    try:
        with held_library_logs():
            return load(folder)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - see the docstring
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"{folder}: {what} cannot be loaded ({type(err).__name__}: {reason})") from None


@contextlib.contextmanager
def held_library_logs(name: str = "diffusers"):
    """Hold what the library logs while a part loads; show it only if the load succeeds.

    diffusers logs a damage before it raises (a weights file not found) or before the strict loader refuses it
    (weights the config does not name): on a failure, the one error line says it, and a second line from the
    library would only repeat it. On success the held lines (a config field it ignores, ...) go out as they were.
    """
    logger = logging.getLogger(name)
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record):
            held.append(record)

    handlers, propagate = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [Hold()], False
    try:
        yield
    except BaseException:
        held.clear()
        raise
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        for record in held:
            logger.handle(record)


@contextlib.contextmanager
def held_warnings():
    """Hold the Python warnings raised while a part loads; show them only if the load succeeds.

    A config that builds layers of zero width makes torch warn ("Initializing zero-element tensors is a no-op")
    before the weights are refused: the one error line says what is wrong, and the warnings would only come before
    it. On success they go out as they were recorded.
    """
    with warnings.catch_warnings(record=True) as caught:  # the filters in force still choose what is recorded
        yield
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def strict_loader(model_class):
    """`model_class.from_pretrained` (a diffusers ModelMixin) that refuses what diffusers only warns about.

    diffusers initialises weights missing from the safetensors file at random (a flipped byte in a tensor name
    does that) and skips unexpected ones with a warning; for a shared model folder both are damage. It also
    falls back to pickled `.bin` weights when the safetensors file is absent; we never unpickle.
    """
    def load(folder):
        check_config_sizes(folder)
        model, info = model_class.from_pretrained(folder, use_safetensors=True, output_loading_info=True,
                                                  local_files_only=True)  # a folder, never the hub
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            if info.get(key):
                raise UserError(f"{folder}: weights do not match config.json ({key.replace('_', ' ')}: "
                                f"{[k if isinstance(k, str) else k[0] for k in list(info[key])[:2]]})")
        check_latent_scale(folder, model.config)
        return model
    return load


MAX_CONFIG_INT = 1 << 16  # wider than any channel count, size or id this tool's models use
MAX_LAYERS = 64  # per block: `layers_per_block: 1e12` would build modules until memory runs out
MAX_LIST = 64


def config_object(path) -> dict | None:
    """The settings in a model's JSON config file; None when it is missing or not JSON (the loader names that).

    Any other JSON is refused here: diffusers reads a config that holds a string (or a number) as the name of a
    model on the Hugging Face hub and asks the network for it, retrying for about 20 s, before it fails.
    """
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(config, dict):
        kind = {str: "string", list: "array", bool: "boolean", type(None): "null"}.get(type(config), "number")
        raise UserError(f"{path}: holds a JSON {kind}, not an object of settings")
    return config


def check_config_sizes(folder) -> None:
    """Refuse a model config.json whose sizes no real model has, before diffusers builds the modules.

    diffusers instantiates whatever the config says; a damaged number (one layer per block becoming
    10^12) hangs the loader while memory fills, instead of failing.
    """
    path = Path(folder) / "config.json"
    config = config_object(path)
    if config is None:
        return  # missing or unreadable: the loader names it
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > MAX_LIST:
            raise UserError(f"{path}: field '{key}' lists {len(value)} entries (at most {MAX_LIST})")
        limit = MAX_LAYERS if "layers" in key else MAX_CONFIG_INT
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > limit:
                raise UserError(f"{path}: field '{key}' is {v}, beyond any model this tool builds (at most {limit})")
            if isinstance(v, int) and not isinstance(v, bool) and v < 0:  # a count, size or id: built, then failed
                raise UserError(f"{path}: field '{key}' is {v}; no model this tool builds has a negative {key}")


def check_latent_scale(folder, config) -> None:
    """A VAE's `scaling_factor` (> 0) and `shift_factor` (or null) must be finite numbers: every latent
    is divided or shifted by them, and diffusers loads whatever config.json says."""
    for key, positive in (("scaling_factor", True), ("shift_factor", False)):
        if key not in config or (config[key] is None and not positive):
            continue
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            kind = "a finite number > 0" if positive else "a finite number or null"
            raise UserError(f"{Path(folder) / 'config.json'}: field '{key}' must be {kind}, got {str(value)[:40]!r}")


# -- transitions -----------------------------------------------------------

@dataclass
class Transitions:
    path: Path
    frames: np.ndarray  # (S, C, H, W, 3) uint8, memory-mapped
    manifest: dict

    @property
    def seeds(self) -> list[int]:
        return list(self.manifest["seeds"])

    @property
    def conditions(self) -> list:
        return list(self.manifest["conditions"])

    @property
    def has_input_frame(self) -> bool:
        return bool(self.manifest.get("has_input_frame", False))

    def scores(self) -> list[dict] | None:
        """Rows of scores.csv as dicts (numbers as floats), or None before scoring."""
        path = self.path / "scores.csv"
        if not path.exists():
            return None
        try:
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle))
        except (UnicodeDecodeError, csv.Error) as err:
            raise UserError(f"{path}: malformed CSV ({type(err).__name__}); score the transitions again") from None
        if len(rows) != self.frames.shape[0] * self.frames.shape[1]:
            raise UserError(f"{path}: has {len(rows)} score rows but the folder holds "
                            f"{self.frames.shape[0] * self.frames.shape[1]} frames "
                            f"({self.frames.shape[0]} seeds x {self.frames.shape[1]} columns); score it again")
        return rows


def read_transitions(path) -> Transitions:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: transitions folder not found")
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise UserError(f"{manifest_path}: missing; {path} is not a transitions folder")
    integrity.verify(path)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{manifest_path}: malformed JSON ({type(err).__name__})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{manifest_path}: top level must be a JSON object, got {type(manifest).__name__}")
    for field in ("seeds", "conditions"):
        if field not in manifest:
            raise UserError(f"{manifest_path}: field '{field}' is missing")
    seeds, conditions = manifest["seeds"], manifest["conditions"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"{manifest_path}: field 'seeds' must be a list of integers")
    if not isinstance(conditions, list) or not all(
            c is None or (isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1) for c in conditions):
        raise UserError(f"{manifest_path}: field 'conditions' must be a list of numbers in [0, 1] (or null)")
    frames_path = path / "frames.npy"
    if not frames_path.exists():
        raise UserError(f"{frames_path}: missing")
    frames = read_npy(frames_path, mmap=True)
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise UserError(f"{frames_path}: expected uint8 (seeds, conditions, H, W, 3), "
                        f"got {frames.dtype} {frames.shape}")
    if frames.shape[0] != len(manifest["seeds"]) or frames.shape[1] != len(manifest["conditions"]):
        raise UserError(f"{manifest_path}: field 'seeds'/'conditions' ({len(manifest['seeds'])} x "
                        f"{len(manifest['conditions'])}) does not match frames.npy {frames.shape[:2]}")
    return Transitions(path=path, frames=frames, manifest=manifest)


def write_transitions(out, frames: np.ndarray, manifest: dict, overwrite: bool = False,
                      captions: list[str] | None = None) -> Path:
    """Write frames.npy, manifest.json and one PNG strip per seed, atomically."""
    from .images import save_png, strip  # local: matplotlib-free but PIL-heavy

    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    manifest = {"format": FORMAT[TRANSITIONS], "kind": "transition", "has_input_frame": False, **manifest}
    if frames.shape[0] != len(manifest["seeds"]) or frames.shape[1] != len(manifest["conditions"]):
        raise ValueError("frames shape does not match seeds x conditions")
    if captions is None:
        captions = [("input" if (i == 0 and manifest["has_input_frame"]) else f"y={c:.2f}")
                    if c is not None else "input" for i, c in enumerate(manifest["conditions"])]
    with atomic_dir(out, overwrite) as tmp:
        save_npy(tmp / "frames.npy", frames)
        write_json(tmp / "manifest.json", manifest)
        for s, seed in enumerate(manifest["seeds"]):
            save_png(tmp / f"strip-{seed}.png", strip(frames[s], captions))
    return Path(out)
