"""Generate a labelled patch dataset from a diffusion pipeline (training data for downstream classifiers).

    mitosis-ldm generate --pipeline runs/demo/diffusion/model --n 4000 --labels match:runs/demo/data/synth \
        [--guidance G] [--guidance-interval LOW,HIGH] [--guidance-rescale PHI] [--guide null|weak]
        [--null-guidance N] [--null-guidance-middle M] [--null-guidance-middle-below L] [--steps S] [--sampler dpm++]
        [--seed 0] --out runs/gen
        [--resume] [--overwrite]
    accelerate launch --multi_gpu --num_processes 2 -m diffusion.generate ...   (shards split across processes)

Writes an ordinary patch dataset (patches.npy, labels.csv, dataset.json; see
patches/dataset.py) with `source=generated`: `label` is the condition the
patch was rendered at, `votes` is empty, `hard_label` is condition >= 0.5, and
extra columns `seed` (the patch's noise seed: `mitosis-ldm transitions --seeds
SEED` renders the same nucleus), `guidance` and `condition`. Splits are random.

`--labels`: `uniform` (conditions drawn uniformly from [0, 1]),
`match:DATASET` (drawn from the soft labels of DATASET's train split), or a
comma list such as `0,0.5,1` (cycled, so every value is equally frequent).

Patch i's condition and noise come from (--seed, i) alone, never from a running
random stream, so a run killed and continued with `--resume` (finished shards
are kept in a hidden `.OUT.partial/` folder) and a run split across processes
give the same dataset as one uninterrupted run. Guidance, its schedule (the
same flags as `transitions`), steps and sampler default to the pipeline's
(pipeline.json); dataset.json's `generation` records the values used.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from mitosis_ldm.errors import UserError, check_at_least, check_seed, user_errors
from mitosis_ldm.io import check_new_output
from mitosis_ldm.launch import process_state, release_processes
from patches.dataset import (PatchDataset, Shard, SplitConfig, build_dataset, partial_folder, pending_jobs,
                             prepare_partial, run_job)

from .pipeline import MitosisPipeline
from .schedulers import SAMPLERS
from .sampling_args import (add_schedule_flags, check_conditions, check_sampling_args, check_schedule_flags,
                            describe_schedule)

_PIPELINES: dict[str, MitosisPipeline] = {}  # one load per process, shared by its shards


# -- what each patch gets -----------------------------------------------------------

def patch_seed(seed: int, index: int) -> int:
    """Patch `index`'s noise seed, a function of (seed, index) only."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0] & 0x7FFFFFFF)


def parse_labels(text: str) -> tuple[str, list[float] | None]:
    """--labels -> (kind, values): ('uniform', None), ('match', soft labels) or ('values', the list)."""
    text = str(text).strip()
    if text == "uniform":
        return "uniform", None
    if text.startswith("match:"):
        root = Path(text[len("match:"):])
        ds = PatchDataset(root, split="train", labelled_only=True)
        if len(ds) == 0:
            raise UserError(f"{root / 'labels.csv'}: field 'label' is empty for every train row; --labels match: "
                            f"needs a dataset with soft labels")
        return "match", sorted(ds.soft_labels.astype(float).round(6).tolist())
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--labels: expected uniform, match:DATASET or values such as 0,0.5,1; got '{text}'") from None
    return "values", check_conditions(values, "--labels")


def draw_conditions(kind: str, values: list[float] | None, seed: int, n: int) -> list[float]:
    """The condition of every patch, each drawn from (seed, index) alone."""
    if kind == "values":
        return [float(values[i % len(values)]) for i in range(n)]
    out = []
    for i in range(n):
        u = np.random.default_rng([seed, i, 1]).random()  # stream 1: the label (the noise seed uses none)
        if kind == "uniform":
            out.append(round(float(u), 6))
        else:
            out.append(float(values[min(int(u * len(values)), len(values) - 1)]))
    return out


# -- one shard ------------------------------------------------------------------------

def load_pipeline(path: str) -> MitosisPipeline:
    if path not in _PIPELINES:
        # a GPU when accelerate has one (each process its own), else the CPU
        device = process_state().device
        _PIPELINES[path] = MitosisPipeline.from_pretrained(path).to(device)
    return _PIPELINES[path]


def render_shard(pipeline: str, model_hash: str, start: int, seeds: list[int], conditions: list[float],
                 guidance: float, steps: int, sampler: str, batch_size: int, schedule: dict) -> Shard:
    """Patches start ... start + len(seeds) - 1, in UNet batches of mixed conditions."""
    pipe = load_pipeline(pipeline)
    images = pipe.samples(seeds, conditions, guidance=guidance, steps=steps, sampler=sampler, batch_size=batch_size,
                          **schedule)
    rows = [{"id": f"gen-{start + k:07d}", "source": "generated", "slide": "generated", "x": "", "y": "",
             "label": c, "votes": "", "hard_label": int(c >= 0.5), "seed": s, "guidance": guidance, "condition": c}
            for k, (s, c) in enumerate(zip(seeds, conditions))]
    return Shard(images, rows)


def shard_jobs(pipe: MitosisPipeline, seeds, conditions, guidance, steps, sampler, shard_size, batch_size,
               schedule: dict):
    jobs = []
    for j, start in enumerate(range(0, len(seeds), shard_size)):
        stop = start + shard_size
        jobs.append((f"shard-{j:05d}", render_shard, {
            "pipeline": str(pipe.path), "model_hash": pipe.model_hash, "start": start, "seeds": seeds[start:stop],
            "conditions": conditions[start:stop], "guidance": guidance, "steps": steps, "sampler": sampler,
            "batch_size": batch_size, "schedule": schedule}))
    return jobs


def render_jobs(jobs: list, out: Path, n: int, size: int, resume: bool) -> int:
    """Fill the partial folder with every shard, split across accelerate processes; returns patches rendered now."""
    from tqdm.auto import tqdm

    state = process_state()
    if state.is_main_process:
        if not resume and partial_folder(out).exists():
            shutil.rmtree(partial_folder(out))  # a fresh run; --resume keeps the finished shards
        prepare_partial(out, jobs, size, 0)  # also empties a partial folder left by other settings
    state.wait_for_everyone()
    todo = pending_jobs(partial_folder(out), jobs)
    left = sum(len(job[2]["seeds"]) for job in todo)
    if resume and state.is_main_process:
        print(f"resuming: {n - left} of {n} patches already rendered")
    with state.split_between_processes(todo) as mine, \
            tqdm(total=left, desc=f"generate -> {out.name}", unit="patch", disable=not state.is_main_process) as bar:
        for job in mine:
            run_job(job)
            bar.update(len(job[2]["seeds"]) * state.num_processes)  # the others render alongside
    state.wait_for_everyone()
    return left


@user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(prog="mitosis-ldm generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="diffusion pipeline folder (or its run folder)")
    parser.add_argument("--n", type=int, required=True, help="patches to generate")
    parser.add_argument("--labels", default="uniform",
                        help="uniform | match:DATASET | a list such as 0,0.5,1, cycled (a value listed twice comes "
                             "twice as often)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    add_schedule_flags(parser)
    parser.add_argument("--steps", type=int, help="sampler steps (default: the pipeline's)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), help="default: the pipeline's")
    parser.add_argument("--seed", type=int, default=0, help="patch i's noise and label come from (seed, i)")
    parser.add_argument("--val", type=float, default=0.1, help="fraction of patches in the val split")
    parser.add_argument("--test", type=float, default=0.1, help="fraction of patches in the test split")
    parser.add_argument("--shard-size", type=int, default=256, help="patches per resumable shard")
    parser.add_argument("--batch-size", type=int, default=32, help="patches in one UNet batch")
    parser.add_argument("--out", required=True, type=Path, help="patch dataset folder to write")
    parser.add_argument("--resume", action="store_true", help="keep the shards a killed run finished")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    # validate everything before loading or rendering anything
    check_at_least(args.n, "--n")
    check_seed(args.seed)
    for flag, value in (("--shard-size", args.shard_size), ("--batch-size", args.batch_size)):
        check_at_least(value, flag)
    if not (0 <= args.val and 0 <= args.test and args.val + args.test < 1):
        raise UserError(f"--val/--test: must be >= 0 with a sum below 1, got {args.val:g} + {args.test:g}")
    if args.guidance is not None or args.steps is not None:
        check_sampling_args(0.0 if args.guidance is None else args.guidance, 1 if args.steps is None else args.steps)
    schedule = check_schedule_flags(args)
    kind, values = parse_labels(args.labels)
    check_new_output(args.out, args.overwrite)
    pipe = MitosisPipeline.from_pretrained(args.pipeline)
    _PIPELINES[str(pipe.path)] = pipe
    steps = int(pipe.info.get("default_steps", 20)) if args.steps is None else args.steps
    sampler = pipe.info.get("default_sampler", "dpm++") if args.sampler is None else args.sampler
    # every shard renders with the whole schedule, resolved once (JSON-ready: it is part of the shards' fingerprint)
    guidance, schedule = pipe.schedule(args.guidance, steps, **schedule)

    seeds = [patch_seed(args.seed, i) for i in range(args.n)]
    conditions = draw_conditions(kind, values, args.seed, args.n)
    jobs = shard_jobs(pipe, seeds, conditions, guidance, steps, sampler, args.shard_size, args.batch_size, schedule)
    size = pipe.image_shape[0]
    t0 = time.time()
    rendered = render_jobs(jobs, args.out, args.n, size, args.resume)
    seconds = time.time() - t0
    is_main = process_state().is_main_process
    release_processes()  # every shard is on disk: no more collectives
    if not is_main:
        return
    settings = {"n": args.n, "labels": args.labels, "guidance": guidance, **schedule, "steps": steps,
                "sampler": sampler, "seed": args.seed, "shard_size": args.shard_size, "batch_size": args.batch_size}
    meta = {"source": "generated", "generated": True, "source_file": str(pipe.path), "mpp": None,
            "label_definition": "label = the condition the patch was generated at; hard_label = condition >= 0.5; "
                                "votes empty (no experts)",
            "pipeline": str(pipe.path), "pipeline_hash": pipe.model_hash, "generation": settings,
            "pipeline_sample_defaults": {k: v for k, v in pipe.info.items() if k.startswith("default_")},
            "seconds": round(seconds, 3)}
    build_dataset(args.out, jobs, patch_size=size, margin=0, meta=meta, overwrite=args.overwrite,
                  split=SplitConfig(mode="random", val=args.val, test=args.test, seed=args.seed), progress=False)
    print(f"wrote {args.out}: {args.n} patches ({args.labels}; {describe_schedule(guidance, schedule)}, "
          f"{sampler}, {steps} steps) "
          f"in {seconds:.1f} s, {rendered / max(seconds, 1e-9):.2f} patches/s ({rendered} rendered by this run)")


if __name__ == "__main__":
    main()
