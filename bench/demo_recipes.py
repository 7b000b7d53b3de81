"""What a shorter demo recipe buys: the whole demo, end to end, at a fraction of its training steps, and its targets.

    python bench/demo_recipes.py [--scale 0.15 --scale 0.4 ...] [--seeds 64] [--root runs/demo_recipes]
        [--budget 540] [--mixed-precision no|bf16] [--batch-scale 1] [--out runs/demo_recipes.json]

For each `--scale s` it writes the demo's three training recipes (configs/demo: autoencoder, classifier, diffusion)
with every step count multiplied by s: `max_steps`, the warm-up, checkpoint, evaluation and preview intervals, the
autoguidance snapshot step, and the EMA's horizon 1 / (1 - decay). Everything else, learning rates and model
sizes included, stays the recipe's. It then runs `python -m mitosis_ldm.demo --configs <those> --seeds N` into its
own folder under `--root`, every stage through its real entry point as `make demo` runs them, and reads back the
stage times and the report's target lines. `--scale 1` is the demo's own recipe (with `--seeds 256`, `make demo`).
`--mixed-precision bf16` also sets `train.mixed_precision: bf16` in all three recipes: CPU autocast, which hosts with
AMX or AVX512-BF16 units run faster (docs/diffusion-studies.md has the demo's recipe measured that way).
`--batch-scale b` also multiplies every recipe's `train.batch_size` by b (rounded, at least 1): each step then costs
about b of the recipe's, at the same number of steps, where `--scale` keeps the batch and cuts the steps.

The peer, measured in the same run before and after the demos, is a 2048 x 2048 fp32 matmul: how fast this host
is while the recipes run, since hosts of this kind differ by up to 1.7x and one host from day to day.

Prints JSON: per scale {steps per stage, stage_seconds, total_seconds, within_budget, targets {value, target, met}},
and the peer's rate. Every run is a whole demo: minutes each (the demo's recipe itself, about 20-50 minutes).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_budget import matmul_rate  # noqa: E402
from mitosis_ldm.demo import CONFIGS, RECIPES  # noqa: E402

# (section, key) of every field counted in training steps, per recipe
STEP_FIELDS = {
    "autoencoder": [("train", "max_steps"), ("train", "lr_warmup_steps"), ("train", "checkpoint_every")],
    "classifier": [("train", "max_steps"), ("train", "lr_warmup_steps"), ("train", "checkpoint_every"),
                   ("ensemble", "eval_every")],
    "diffusion": [("train", "max_steps"), ("train", "lr_warmup_steps"), ("train", "checkpoint_every"),
                  ("preview", "every"), ("sample", "guide_snapshot_step")],
}


def scale_recipe(recipe: dict, name: str, scale: float) -> dict:
    """A copy of one stage's recipe with every step count (and the EMA's horizon) times `scale`."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    out = copy.deepcopy(recipe)
    for section, key in STEP_FIELDS[name]:
        if section in out and out[section].get(key) is not None:
            out[section][key] = max(1, round(out[section][key] * scale))
    train = out.get("train", {})
    decay = train.get("ema_decay")
    if decay:  # horizon 1 / (1 - decay) steps, scaled like the steps
        train["ema_decay"] = round(1 - 1 / max(1.0, scale / (1 - decay)), 6)
    return out


def write_recipes(scale: float, folder: Path, source: Path = ROOT / CONFIGS, mixed_precision: str = "no",
                  batch_scale: float = 1.0) -> dict:
    """The three scaled recipes under `folder`, trained at `mixed_precision` with `batch_scale` x each recipe's batch;
    returns {stage: max_steps}."""
    if not 0 < batch_scale <= 1:
        raise ValueError(f"batch scale must be in (0, 1], got {batch_scale}")
    folder.mkdir(parents=True, exist_ok=True)
    steps = {}
    for name in RECIPES:
        recipe = scale_recipe(yaml.safe_load((source / f"{name}.yaml").read_text()), name, scale)
        if mixed_precision != "no":
            recipe.setdefault("train", {})["mixed_precision"] = mixed_precision
        if batch_scale != 1:
            recipe["train"]["batch_size"] = max(1, round(recipe["train"]["batch_size"] * batch_scale))
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        steps[name] = recipe["train"]["max_steps"]
    return steps


def read_run(run: Path) -> dict:
    """Stage times and the report's targets from one finished demo folder."""
    timings = json.loads((run / "demo_timings.json").read_text())
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    targets = {name: {"value": None if t["value"] is None else round(t["value"], 4), "target": t["target"],
                      "met": t["met"]} for name, t in metrics["targets"].items()}
    return {"stage_seconds": timings["stage_seconds"], "total_seconds": timings["total_seconds"],
            "targets": targets, "targets_met": sum(bool(t["met"]) for t in targets.values()),
            "targets_total": len(targets)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, action="append",
                        help="fraction of the demo recipe's training steps (repeatable; default 0.15 and 0.4)")
    parser.add_argument("--seeds", type=int, default=64, help="transitions per demo (the issue's floor is 64)")
    parser.add_argument("--root", type=Path, default=Path("runs/demo_recipes"))
    parser.add_argument("--budget", type=float, default=540.0, help="the demo's budget after set-up, seconds")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                        help="train every recipe at this precision (bf16: CPU autocast; default no, the demo's fp32)")
    parser.add_argument("--batch-scale", type=float, default=1.0,
                        help="fraction of every recipe's batch size, at the same steps (default 1, the recipe's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    scales = args.scale or [0.15, 0.4]
    root = args.root.resolve()
    for s in scales:
        if not 0 < s <= 1:
            parser.error(f"--scale {s}: must be in (0, 1]")
    if not 0 < args.batch_scale <= 1:
        parser.error(f"--batch-scale {args.batch_scale}: must be in (0, 1]")
    peer_before = matmul_rate()
    runs = {}
    for s in scales:
        folder = root / (f"scale-{s:g}" + (f"-batch-{args.batch_scale:g}" if args.batch_scale != 1 else "")
                         + (f"-{args.mixed_precision}" if args.mixed_precision != "no" else ""))
        steps = write_recipes(s, folder / "configs", mixed_precision=args.mixed_precision,
                              batch_scale=args.batch_scale)
        cmd = [sys.executable, "-m", "mitosis_ldm.demo", "--root", str(folder / "demo"), "--configs",
               str(folder / "configs"), "--seeds", str(args.seeds)]
        print(f"=== scale {s:g}: " + " ".join(cmd), file=sys.stderr, flush=True)
        start = time.time()
        done = subprocess.run(cmd, cwd=ROOT)
        if done.returncode != 0:
            runs[f"{s:g}"] = {"steps": steps, "failed": f"exit {done.returncode}",
                              "seconds": round(time.time() - start, 1)}
            continue
        run = read_run(folder / "demo")
        runs[f"{s:g}"] = {"steps": steps, **run, "within_budget": run["total_seconds"] <= args.budget}
    peer_after = matmul_rate()
    result = {
        "what": "the whole demo at a fraction of its training steps: time after set-up and the report's targets",
        "seeds": args.seeds, "budget_s": args.budget, "mixed_precision": args.mixed_precision,
        "batch_scale": args.batch_scale,
        "peer_matmul_gflop_s": {"before": round(peer_before / 1e9, 1), "after": round(peer_after / 1e9, 1)},
        "scales": runs,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        from mitosis_ldm.io import write_json

        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
