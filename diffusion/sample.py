"""Transitions: render the same nucleus at conditions y = 0 ... 1.

    mitosis-ldm transitions --pipeline runs/demo/diffusion/model --seeds 0-15 --conditions 0:1:11 \
        [--guidance 3] [--guidance-interval 0,1] [--guidance-rescale 0] [--guide null|weak] [--null-guidance 0] \
        [--null-guidance-middle 1] [--null-guidance-middle-below 1] [--steps 20] [--sampler dpm++] \
        --out runs/demo/transitions [--overwrite]
    accelerate launch --multi_gpu --num_processes 2 -m diffusion.sample ...   (seeds split across processes)

Every condition of a seed starts from the same initial noise; the
conditional and unconditional passes share one batched UNet call. Same seeds
and flags give bit-identical frames on CPU. `--guidance`, the guidance
schedule (`--guidance-interval`, `--guidance-rescale`, `--guide`,
`--null-guidance`, `--null-guidance-middle`, `--null-guidance-middle-below`), `--steps` and `--sampler`
default to the values stored in the pipeline's pipeline.json.
Writes a transitions folder: frames.npy (seeds, conditions, H, W, 3),
manifest.json and one PNG strip per seed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mitosis_ldm.artifacts import write_transitions
from mitosis_ldm.errors import check_at_least, user_errors
from mitosis_ldm.io import check_new_output
from mitosis_ldm.launch import process_state, release_processes

from .pipeline import MitosisPipeline
from .schedulers import SAMPLERS
from .sampling_args import (add_schedule_flags, check_sampling_args, check_schedule_flags, describe_schedule,
                            parse_conditions, parse_seeds)


def render_split(pipe: MitosisPipeline, seeds: list[int], conditions, guidance, steps, sampler,
                 seeds_per_batch: int, **schedule) -> np.ndarray:
    """Split seeds across accelerate processes, render, gather on every process in seed order.

    `schedule`: the keyword overrides `MitosisPipeline.transitions` takes (as `MitosisPipeline.schedule` resolves
    them).
    """
    state = process_state()
    pipe.to(state.device)  # a GPU when accelerate has one (each process its own), else the CPU
    if state.num_processes == 1:
        return pipe.transitions(seeds, conditions, guidance, steps, sampler, seeds_per_batch, **schedule)
    from accelerate.utils import gather_object

    with state.split_between_processes(seeds) as mine:
        frames = pipe.transitions(mine, conditions, guidance, steps, sampler, seeds_per_batch, **schedule) \
            if mine else None
    parts = gather_object([(state.process_index, frames)])
    ordered = [f for _, f in sorted(parts, key=lambda p: p[0]) if f is not None]
    return np.concatenate(ordered)


def is_main_process() -> bool:
    return process_state().is_main_process


@user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(prog="mitosis-ldm transitions",
                                     description="Render the same nucleus at conditions y = 0 ... 1.")
    parser.add_argument("--pipeline", required=True, help="diffusion pipeline folder (or its run folder)")
    parser.add_argument("--seeds", default="0-15", help="e.g. 0-15 or 0,3,7 (default 0-15)")
    parser.add_argument("--conditions", default="0:1:11", help="START:STOP:COUNT or a list (default 0:1:11)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    add_schedule_flags(parser)
    parser.add_argument("--steps", type=int, help="sampler steps (default: the pipeline's)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), help="default: the pipeline's")
    parser.add_argument("--seeds-per-batch", type=int, default=4, help="seeds rendered in one UNet batch")
    parser.add_argument("--out", required=True, help="transitions folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--verify", action="store_true",
                        help="hash every file of the pipeline folder against its record "
                             "(loads check sizes and configs)")
    args = parser.parse_args(argv)
    if args.verify:
        from mitosis_ldm import integrity

        integrity.verify_fully()
    # validate everything before loading or rendering anything
    seeds = parse_seeds(args.seeds)
    conditions = parse_conditions(args.conditions)
    check_at_least(args.seeds_per_batch, "--seeds-per-batch")
    if args.guidance is not None or args.steps is not None:
        check_sampling_args(0.0 if args.guidance is None else args.guidance, 1 if args.steps is None else args.steps)
    schedule = check_schedule_flags(args)
    check_new_output(args.out, args.overwrite)
    pipe = MitosisPipeline.from_pretrained(args.pipeline)
    steps = int(pipe.info.get("default_steps", 20)) if args.steps is None else args.steps
    sampler = pipe.info.get("default_sampler", "dpm++") if args.sampler is None else args.sampler
    guidance, schedule = pipe.schedule(args.guidance, steps, **schedule)
    t0 = time.time()
    frames = render_split(pipe, seeds, conditions, guidance, steps, sampler, args.seeds_per_batch, **schedule)
    seconds = time.time() - t0
    is_main = is_main_process()
    release_processes()  # the frames are gathered: no more collectives
    if not is_main:
        return
    manifest = {"kind": "transition", "seeds": seeds, "conditions": conditions, "guidance": guidance,
                **schedule, "sampler": sampler,
                "steps": steps, "model_hash": pipe.model_hash, "pipeline": str(pipe.path),
                "seconds": round(seconds, 3)}
    write_transitions(args.out, frames, manifest, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(seeds)} seeds x {len(conditions)} conditions in {seconds:.1f} s "
          f"({seconds / len(seeds):.2f} s per transition; {describe_schedule(guidance, schedule)}, {sampler}, "
          f"{steps} steps)")


if __name__ == "__main__":
    main()
