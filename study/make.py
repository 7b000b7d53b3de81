"""Draw a balanced, blinded reader-study set and write study.html, key.json and study.json.

    mitosis-ldm study make --transitions runs/demo/transitions [--real2gen runs/demo/real2gen] \\
        --dataset runs/demo/data/synth --n-real 40 --n-generated 40 --seed 0 --out runs/demo/study

Real patches come from the dataset's held-out (test) split, spread over its
soft-label bins; generated frames come from the transitions (and real2gen)
folders, spread over the conditions. Every image goes through one PNG encoder
call, so real and generated payloads are indistinguishable by format; items get
opaque ids drawn from the study seed and the page lists them sorted by id.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mitosis_ldm.artifacts import PATCHES, TRANSITIONS, expect_artifact, read_transitions
from mitosis_ldm.errors import UserError
from mitosis_ldm.io import atomic_dir, write_json, write_text
from mitosis_ldm.label_groups import group_soft_labels

from . import CONFIDENCES, RATINGS, STUDY_FORMAT
from .page import render

MAX_GROUPS = 11  # labels with more distinct values than this are grouped into FALLBACK_BINS equal-width bins
FALLBACK_BINS = 5


@dataclass
class Candidate:
    """One image that may enter the study, with what the key will say about it."""

    kind: str            # "real" | "generated"
    image: np.ndarray    # (H, W, 3) uint8
    group: float         # soft label (real) or condition (generated): what the draw balances over
    source: str          # where it came from, e.g. "synth:p12" or "transitions:seed=3:y=0.5"
    extra: dict


def encode_png(image: np.ndarray) -> bytes:
    """The one encoder every study image goes through: RGB, no metadata, no optional chunks."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB").save(buffer, format="PNG",
                                                                                  compress_level=9)
    return buffer.getvalue()


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def real_candidates(dataset) -> list[Candidate]:
    """Held-out (test split) patches that carry a soft label."""
    from patches.dataset import PatchDataset

    ds = PatchDataset(dataset, split="test", labelled_only=True)
    name = Path(dataset).name
    images = ds.uint8() if len(ds) else np.zeros((0, 1, 1, 3), np.uint8)
    degree = ds.true_degree
    return [Candidate("real", images[i], float(ds.soft_labels[i]), f"{name}:{pid}",
                      {"true_degree": float(degree[i])} if np.isfinite(degree[i]) else {})
            for i, pid in enumerate(ds.ids())]


def generated_candidates(folders: list) -> list[Candidate]:
    """Every generated frame (real2gen input columns, the real patches, are left out)."""
    out = []
    for folder in folders:
        t = read_transitions(folder)
        kind = t.manifest.get("kind", "transition")
        for s, seed in enumerate(t.seeds):
            for c, condition in enumerate(t.conditions):
                if condition is None or (c == 0 and t.has_input_frame):
                    continue
                out.append(Candidate("generated", t.frames[s, c], float(condition),
                                     f"{t.path.name}:seed={seed}:y={float(condition):g}",
                                     {"folder": t.path.name, "folder_kind": kind, "seed": int(seed)}))
    return out


def label_bins(values: np.ndarray) -> np.ndarray:
    """Bin index per value: each distinct value when there are few, else equal-width bins on [0, 1]."""
    return group_soft_labels(values, MAX_GROUPS, FALLBACK_BINS)[0]


def spread_draw(candidates: list[Candidate], n: int, rng: np.random.Generator, what: str,
                flag: str) -> list[Candidate]:
    """Draw n candidates round-robin over their groups (random within a group), avoiding repeated nuclei."""
    if n > len(candidates):
        raise UserError(f"{flag}: asks for {n} {what} patches but only {len(candidates)} are available")
    bins = label_bins(np.array([c.group for c in candidates], float))
    pools = {b: list(rng.permutation(np.flatnonzero(bins == b))) for b in np.unique(bins)}
    used_nuclei: dict[tuple, int] = {}  # a generated nucleus (folder, seed) shown at many conditions is a tell
    chosen = []
    order = list(pools)
    while len(chosen) < n:
        for b in order:
            if len(chosen) == n or not pools[b]:
                continue
            pool = pools[b]
            best = min(range(len(pool)), key=lambda k: used_nuclei.get(_nucleus(candidates[pool[k]]), 0))
            pick = candidates[pool.pop(best)]
            used_nuclei[_nucleus(pick)] = used_nuclei.get(_nucleus(pick), 0) + 1
            chosen.append(pick)
    return chosen


def _nucleus(c: Candidate) -> tuple:
    return (c.extra.get("folder"), c.extra.get("seed"), c.source if c.kind == "real" else None)


def opaque_ids(n: int, rng: np.random.Generator) -> list[str]:
    ids: set[str] = set()
    while len(ids) < n:
        ids.add(rng.bytes(4).hex())
    return sorted(ids)


def make_study(transitions: list, real2gen: list, dataset, n_real: int, n_generated: int, seed: int, out,
               overwrite: bool = False, title: str = "Mitotic figure reader study") -> dict:
    """Draw the set and write the study folder atomically; returns study.json's content."""
    folders = [expect_artifact(p, TRANSITIONS, "--transitions") for p in transitions]
    folders += [expect_artifact(p, TRANSITIONS, "--real2gen") for p in real2gen]
    dataset = expect_artifact(dataset, PATCHES, "--dataset")
    if n_real < 0 or n_generated < 0 or n_real + n_generated == 0:
        raise UserError(f"--n-real/--n-generated: need a positive total, got {n_real} + {n_generated}")
    rng = np.random.default_rng([seed, 0x5717])
    real = spread_draw(real_candidates(dataset), n_real, rng, "held-out real (labelled, test split)", "--n-real")
    generated = spread_draw(generated_candidates(folders), n_generated, rng, "generated", "--n-generated")
    chosen = real + generated
    shapes = {c.image.shape for c in chosen}
    if len(shapes) > 1:
        sizes: dict[str, set] = {}  # folder -> its images' sizes, so the message points at the odd folder
        for c in chosen:
            sizes.setdefault(c.source.split(":", 1)[0], set()).add(f"{c.image.shape[0]}x{c.image.shape[1]}")
        listed = "; ".join(f"{folder}: {', '.join(sorted(s))}" for folder, s in sizes.items())
        raise UserError(f"--dataset/--transitions/--real2gen: the drawn images differ in size ({listed}); "
                        f"a size difference would unblind the study")
    ids = opaque_ids(len(chosen), rng)
    shuffle = rng.permutation(len(chosen))  # which candidate gets which id: nothing in the id order
    entries = {ids[k]: chosen[i] for k, i in enumerate(shuffle)}
    payloads = {item: encode_png(c.image) for item, c in entries.items()}
    key_items = {}
    for item, c in entries.items():
        entry = {"kind": c.kind, "condition": c.group if c.kind == "generated" else None,
                 "soft_label": c.group if c.kind == "real" else None, "source": c.source, **c.extra}
        key_items[item] = entry
    digest = hashlib.sha256(repr(sorted((k, v["source"]) for k, v in key_items.items())).encode())
    for item in ids:
        digest.update(payloads[item])
    study_id = f"{digest.hexdigest()[:12]}"
    study = {
        "format": STUDY_FORMAT, "study_id": study_id, "title": title, "seed": int(seed),
        "n_items": len(ids), "n_real": n_real, "n_generated": n_generated, "items": ids,
        "ratings": list(RATINGS), "confidences": list(CONFIDENCES),
        "image_size": list(next(iter(shapes))[:2]),
        "inputs": {"transitions": [str(p) for p in folders], "dataset": str(dataset)},
    }
    key = {"format": STUDY_FORMAT + "-key", "study_id": study_id, "items": key_items}
    page = render(study_id=study_id, title=title, order_seed=int(seed),
                  items=[{"id": item, "src": png_data_uri(payloads[item])} for item in ids])
    with atomic_dir(out, overwrite) as tmp:
        write_text(tmp / "study.html", page)
        write_json(tmp / "key.json", key)
        write_json(tmp / "study.json", study)
    return study
