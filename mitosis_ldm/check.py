"""`mitosis-ldm check DIR...`: recognise any artifact folder and verify it fully, one line per finding.

    mitosis-ldm check runs/demo/diffusion/model runs/demo/data/synth
    mitosis-ldm check --record runs/shared/classifier    # record hashes where none are recorded yet

What is verified, per folder:
- the recorded content hashes (integrity.json): every recorded file present,
  same size, same sha256 (all files hashed, however large); files present
  but not recorded are findings too;
- the kind's contents: shapes and dtypes of the arrays, the labels file
  against the patches, manifests against frames, pipeline.json against its parts;
- that every part loads, and a tiny forward pass through each model.

Kinds: patch dataset (also generated datasets), autoencoder, classifier,
pipeline, latent cache, transitions (artifacts.py markers), posterior
(posterior.csv + posterior.json), study (study.json + key.json); a training
run folder is checked through its `model/`.

A folder exported before hashes were recorded is reported as a finding ("no
recorded hashes"), the rest is still verified; `--record` writes
integrity.json for such a folder once everything else is clean.
Exit 0 when every folder is clean, 2 otherwise. The checks import the stages
lazily (the spine imports no stage at module level; the dispatcher itself works the same way).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

import numpy as np

from . import integrity
from .artifacts import (AUTOENCODER, CLASSIFIER, LATENTS, PATCHES, PIPELINE, TRANSITIONS, artifact_kind,
                        load_part, read_transitions, strict_loader)
from .errors import EXIT_USER_ERROR, UserError, user_errors

POSTERIOR, STUDY = "posterior", "study"


def kind_of(folder: Path) -> str | None:
    kind = artifact_kind(folder)
    if kind is not None:
        return kind
    if (folder / "posterior.csv").is_file() and (folder / "posterior.json").is_file():
        return POSTERIOR
    if (folder / "study.json").is_file() and (folder / "key.json").is_file():
        return STUDY
    return None


# -- per kind: raise UserError (or anything) on the first problem --------------

def _patches(folder: Path) -> None:
    from patches.dataset import PatchDataset, _hash_dataset

    data = PatchDataset(folder, split=None)  # which checks the array's type and shape, patch size, margin and labels
    images, meta = data.images, data.meta
    stored = meta.get("stored_size", data.patch_size + 2 * data.margin)
    if images.shape[1] != stored:
        raise UserError(f"{folder / 'patches.npy'}: patches are {images.shape[1]}px, dataset.json says {stored}")
    if "count" in meta and meta["count"] != len(images):
        raise UserError(f"{folder / 'dataset.json'}: field 'count' is {meta['count']}, patches.npy holds {len(images)}")
    if meta.get("content_hash") and meta["content_hash"] != _hash_dataset(folder):
        raise UserError(f"{folder / 'dataset.json'}: field 'content_hash' does not match patches.npy + labels.csv")
    np.asarray(images[-1:]).sum()  # the last patch is readable (a truncated file fails here)


def _autoencoder(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    vae = load_part(folder, "the autoencoder", strict_loader(AutoencoderKL)).eval()
    size = int(vae.config.sample_size)
    with torch.no_grad():
        out = vae(torch.zeros(1, 3, size, size)).sample
    if tuple(out.shape) != (1, 3, size, size) or not torch.isfinite(out).all():
        raise UserError(f"{folder}: the autoencoder maps a {size}px patch to {tuple(out.shape)} (or non-finite values)")


def _classifier(folder: Path) -> None:
    from classifier.model import ClassifierEnsemble

    ens = ClassifierEnsemble.from_pretrained(folder, flag="check")
    probs = ens.predict(np.zeros((1, ens.patch_size, ens.patch_size, 3), np.uint8))
    if probs.shape != (1, ens.members) or not np.isfinite(probs).all():
        raise UserError(f"{folder}: the ensemble gives {probs.shape} (or non-finite values) for one patch")


def _pipeline(folder: Path) -> None:
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(folder, flag="check")
    frames = pipe.transitions(seeds=[0], conditions=[0.0, 1.0], steps=1, sampler="ddim")
    if frames.shape != (1, 2, *pipe.image_shape) or frames.dtype != np.uint8:
        raise UserError(f"{folder}: one transition gives {frames.dtype} {frames.shape}, expected "
                        f"(1, 2, {', '.join(map(str, pipe.image_shape))})")


def _latents(folder: Path) -> None:
    from diffusion.cache import LatentCache

    LatentCache(folder)  # which checks that its arrays and cache.json hold together
    _autoencoder(folder / "vae")


def _transitions(folder: Path) -> None:
    t = read_transitions(folder)
    np.asarray(t.frames[-1:]).sum()
    for seed in t.seeds:
        if not (folder / f"strip-{seed}.png").is_file():
            raise UserError(f"{folder / f'strip-{seed}.png'}: missing (one strip per seed)")
    t.scores()


def _posterior(folder: Path) -> None:
    from report.posterior_section import read_posterior  # what the report reads of it, checked as it does

    read_posterior(folder)


def _study(folder: Path) -> None:
    from study.answers import read_study

    read_study(folder)


CHECKS = {PATCHES: _patches, AUTOENCODER: _autoencoder, CLASSIFIER: _classifier, PIPELINE: _pipeline,
          LATENTS: _latents, TRANSITIONS: _transitions, POSTERIOR: _posterior, STUDY: _study}


@contextlib.contextmanager
def library_warnings(name: str = "diffusers"):
    """The warnings the library logs while the parts load, collected as text for findings: a config field the
    model does not have (a misspelt name is ignored, and its default used) is something to report, not a stray
    line before the error."""
    logger, said = logging.getLogger(name), []

    class Collect(logging.Handler):
        def emit(self, record):
            said.append(" ".join(record.getMessage().split()))

    handlers, propagate = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [Collect(logging.WARNING)], False
    try:
        yield said
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def check_folder(folder: Path, record: bool = False) -> tuple[str | None, list[str]]:
    """(kind, findings) for one folder; with `record`, a clean folder without hashes gets them."""
    folder = Path(folder)
    if not folder.is_dir():
        return None, [f"{folder}: not found (or not a folder)"]
    kind = kind_of(folder)
    if kind == "run":
        return check_folder(folder / "model", record)
    if kind is None:
        return None, [f"{folder}: not a mitosis-ldm artifact (no marker file: dataset.json, config.json, "
                      f"pipeline.json, cache.json, manifest.json, posterior.json or study.json)"]
    found = []
    try:
        manifest = integrity.read_manifest(folder)
    except UserError as err:
        manifest, found = None, [str(err)]
    if manifest is not None:
        found += integrity.findings(folder, full=True)
        recorded = set(manifest["files"])
        found += [f"{p}: present but not in {integrity.MANIFEST} (added after export)"
                  for p in integrity._recordable(folder) if p.relative_to(folder).as_posix() not in recorded]
    if not found:  # hashes hold (or none): does every part load and compute?
        with library_warnings() as said:
            try:
                CHECKS[kind](folder)
            except UserError as err:
                found.append(" ".join(str(err).split()))
            except Exception as err:  # noqa: BLE001 - a check must report, not crash
                found.append(f"{folder}: {kind} does not load ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]})")
        found += [f"{folder}: {line}" for line in dict.fromkeys(said)]  # a part loaded twice says it twice
    if manifest is None and not found and record:
        count = integrity.record(folder)
        print(f"{folder}: recorded sha256 of {count} files in {integrity.MANIFEST}")
    elif manifest is None and not any(integrity.MANIFEST in f for f in found):
        found.append(f"{folder}: no recorded hashes ({integrity.MANIFEST} missing: exported before hashes were "
                     f"recorded, or copied without it); `mitosis-ldm check --record {folder}` records them once the "
                     f"folder is otherwise clean")
    return kind, found


@user_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mitosis-ldm check", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="artifact folders (or run folders)")
    parser.add_argument("--record", action="store_true",
                        help="write integrity.json into clean folders that have none yet")
    args = parser.parse_args(argv)
    failed = 0
    for folder in args.folders:
        kind, found = check_folder(folder, args.record)
        for line in found:
            print(line)
        if found:
            failed += 1
        else:
            print(f"{folder}: clean ({kind})")
    if failed:
        print(f"error: {failed} of {len(args.folders)} folder(s) have findings", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)
    return 0


if __name__ == "__main__":
    main()
