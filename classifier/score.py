"""Score images with the classifier ensemble: each member's P(mitotic), the mean and the std.

    mitosis-ldm score --classifier runs/demo/classifier INPUT... --out scores.csv [--overwrite]
    accelerate launch --multi_gpu --num_processes 2 -m classifier.score --classifier ... INPUT... --out scores.csv

INPUT is any mix of PNG/JPEG/TIFF files, folders of them, patch datasets
(`DIR`, `DIR:ID`; `--split` picks one split) and transitions folders. The CSV
has one row per image: name, member_0 ... member_{K-1}, mean, std (population
std over members: the ensemble's disagreement). Each transitions folder also
gets `scores.csv` (name, seed, frame, condition, mean, std, member_*).

Wrong sizes: an image larger than the classifier's input is centre-cropped to
it (a note says how many); a smaller one is refused with one line naming the
file. Every input is read and checked before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mitosis_ldm.artifacts import TRANSITIONS, artifact_kind, read_transitions
from mitosis_ldm.errors import UserError, check_at_least, user_errors
from mitosis_ldm.io import check_new_output, write_text
from mitosis_ldm.launch import process_state, release_processes

from .model import ClassifierEnsemble, fit_size


@dataclass
class TransitionBlock:
    path: Path
    seeds: list[int]
    conditions: list
    start: int  # first row of this folder's frames in the scored batch


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return str(value)


def gather_inputs(inputs: list[str], size: int, overwrite: bool, split: str | None, limit: int | None):
    """Read every input up front: names, images fitted to `size`, and the transitions folders among them."""
    from patches.inputs import gather_images

    names: list[str] = []
    images: list[np.ndarray] = []
    blocks: list[TransitionBlock] = []
    cropped = 0
    for raw in inputs:
        if artifact_kind(raw) == TRANSITIONS:
            t = read_transitions(raw)
            check_new_output(t.path / "scores.csv", overwrite)
            blocks.append(TransitionBlock(t.path, t.seeds, t.conditions, len(names)))
            for s, seed in enumerate(t.seeds):
                for f in range(len(t.conditions)):
                    name = f"{t.path}:seed-{seed}:frame-{f}"
                    frame = np.asarray(t.frames[s, f])
                    cropped += frame.shape[:2] != (size, size)
                    names.append(name)
                    images.append(fit_size(frame, size, name))
            continue
        for item in gather_images([raw], split=split, limit=limit):
            cropped += item.image.shape[:2] != (size, size)
            names.append(item.name)
            images.append(fit_size(item.image, size, item.name))
    if not images:
        raise UserError("no input images given")
    return names, np.stack(images), blocks, cropped


def score_images(ensemble: ClassifierEnsemble, images: np.ndarray, batch_size: int = 256,
                 progress: bool = True) -> np.ndarray:
    """(N, K) probabilities; split across accelerate processes when launched with several."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    # process_state() (cpu=True without a GPU): otherwise `accelerate launch --multi_gpu --num_processes 2` gives each
    # process a state of its own on a machine without GPUs, and both scored every image and both wrote --out
    state = process_state()
    order = np.arange(len(images))
    with state.split_between_processes(order.tolist()) as mine:
        mine = np.asarray(mine, dtype=int)
        chunks = []
        bar = tqdm(total=len(mine), desc="score", unit="patch", disable=not (progress and state.is_main_process))
        for start in range(0, len(mine), batch_size):
            chunks.append(ensemble.predict(images[mine[start: start + batch_size]], batch_size=batch_size))
            bar.update(len(chunks[-1]))
        bar.close()
        local = np.concatenate(chunks) if chunks else np.zeros((0, ensemble.members), np.float32)
    if state.num_processes == 1:
        return local
    # gather_object keeps process order, and split_between_processes hands out contiguous blocks
    rows = gather_object([row for row in local])
    return np.stack(rows)[: len(images)]


def csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[fmt(v) for v in row] for row in rows])
    return buffer.getvalue()


@user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(prog="mitosis-ldm score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", required=True, help="classifier folder (or its training run folder)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders, patch datasets (DIR or DIR:ID) or transitions folders")
    parser.add_argument("--out", required=True, help="output CSV")
    parser.add_argument("--overwrite", action="store_true", help="replace --out and transitions' scores.csv")
    parser.add_argument("--split", choices=["train", "val", "test"], help="only this split of patch datasets")
    parser.add_argument("--limit", type=int, help="at most this many patches per patch dataset")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--verify", action="store_true",
                        help="hash every file of the folders read against their records (loads check sizes, configs)")
    args = parser.parse_intermixed_args(argv)  # options may sit between the inputs
    if args.verify:
        from mitosis_ldm import integrity

        integrity.verify_fully()
    check_at_least(args.batch_size, "--batch-size")
    state = process_state()
    ensemble = ClassifierEnsemble.from_pretrained(args.classifier).to(state.device)  # a GPU where there is one
    out = check_new_output(args.out, args.overwrite)
    names, images, blocks, cropped = gather_inputs(args.inputs, ensemble.patch_size, args.overwrite,
                                                   args.split, args.limit)
    probs = score_images(ensemble, images, args.batch_size, progress=not args.quiet)  # (N, K)
    mean, std = probs.mean(1), probs.std(1)

    is_main = state.is_main_process
    release_processes()  # the scores are gathered: no more collectives
    if not is_main:
        return
    k = ensemble.members
    members = [f"member_{i}" for i in range(k)]
    write_text(out, csv_text(["name", *members, "mean", "std"],
                             [[n, *p, m, s] for n, p, m, s in zip(names, probs, mean, std)]))
    for block in blocks:
        rows, row = [], block.start
        for seed in block.seeds:
            for f, condition in enumerate(block.conditions):
                rows.append([names[row], seed, f, condition, mean[row], std[row], *probs[row]])
                row += 1
        write_text(block.path / "scores.csv",
                   csv_text(["name", "seed", "frame", "condition", "mean", "std", *members], rows))
    note = f"; {cropped} larger images centre-cropped to {ensemble.patch_size}x{ensemble.patch_size}" if cropped else ""
    print(f"scored {len(names)} images with {k} members -> {out}"
          + (f" (+ scores.csv in {len(blocks)} transitions folder(s))" if blocks else "") + note, file=sys.stderr)


if __name__ == "__main__":
    main()
