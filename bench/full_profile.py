"""The GPU recipes (configs/full/) end to end on a short budget: does every stage run there, and how fast?

    python bench/full_profile.py --dataset runs/demo/data/synth --root runs/full-check [--steps 300] [--seeds 64]

Runs, each through its real entry point (`accelerate launch` for training, one
process), on the embedded synthetic benchmark in place of MIDOG++ / CCMCT:
the `base` autoencoder (configs/full/autoencoder.yaml, the patch-GAN switched on
for the last third of the steps), the ResNet34 x4 ensemble (configs/full/classifier.yaml),
the latent cache with dihedral copies, the `base` latent UNet
(configs/full/diffusion.yaml), then `--seeds` transitions from it, real2gen of 16
test patches, the posterior of 64 (the paths that encode real patches), the
classifier's scores of every frame and the report over all of it (the demo's
report settings). `--autoencoder-steps` and `--classifier-steps` shorten the
first two stages where only the later ones are to be measured. Prints JSON:
for each training stage the seconds per optimizer step (the slope of
logs/metrics.jsonl's wall clock, so start-up and export are left out; the
autoencoder's before and after the GAN starts), the recipe's `max_steps` and
the time that many steps would take at that rate, the stage's wall time, and
for the transitions the seconds per 11-frame transition that `transitions`
printed, beside the same command on the CPU (`--cpu-seeds` seeds, every core)
as the peer. A GPU is not required (it then measures the CPU), but that is
what it is for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, str]:
    t0 = time.time()
    with open(log, "w") as stream:  # written as the stage runs: a run stopped by its time limit leaves how far it got
        result = subprocess.run(cmd, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})})
    text = log.read_text()
    if result.returncode != 0:
        lines = text.strip().splitlines()
        said = [line for line in lines if line.startswith("error:")] or lines[-15:]  # the one-line user error, if any
        raise RuntimeError(f"{log.stem} failed (exit {result.returncode}; {log}):\n" + "\n".join(said))
    return time.time() - t0, text


def step_rate(run_dir: Path, first: int = 0, last: int | None = None) -> float | None:
    """Seconds per step between the first and last logged steps in [first, last]."""
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "time_s" in r and r["step"] >= first and (last is None or r["step"] <= last)]
    first_seen: dict[int, float] = {}
    for r in rows:  # a step's later rows (the end-of-run evaluation) carry the evaluation's time too
        first_seen.setdefault(r["step"], r["time_s"])
    steps = sorted(first_seen.items())
    if len(steps) < 2:
        return None
    (s0, t0), (s1, t1) = steps[0], steps[-1]
    return (t1 - t0) / (s1 - s0)


def recipe_steps(config: str) -> int:
    return int(yaml.safe_load((REPO / config).read_text())["train"]["max_steps"])


def training(name: str, module: str, config: str, sets: list[str], out: Path, logs: Path, steps: int,
             smoke: bool) -> dict:
    from mitosis_ldm.launch import accelerate_launch

    if smoke:  # a CPU check of this script itself: batches of 4, fp32 (bf16 autocast crawls on most CPUs)
        sets = [*sets, "--set", "train.batch_size=4", "--set", 'train.mixed_precision="no"',
                "--set", "train.num_workers=0"]
    cmd = accelerate_launch(module, "--config", config, "--set", f"out={out}", "--set", f"train.max_steps={steps}",
                            "--set", "train.log_every=10", "--set", f"train.checkpoint_every={steps}", *sets,
                            "--overwrite")
    seconds, _ = run(cmd, logs / f"{name}.log")
    # the ensemble logs each member in its own run folder; the first member's rate stands for all
    rate = step_rate(out / "members" / "member-0" if (out / "members").is_dir() else out, first=10)
    full = recipe_steps(config)
    return {"wall_s": round(seconds, 1), "steps": steps, "s_per_step": None if rate is None else round(rate, 4),
            "recipe_max_steps": full,
            "recipe_hours_at_this_rate": None if rate is None else round(rate * full / 3600, 2)}


def command(name: str, args: list[str], logs: Path, **extra) -> dict:
    """One `mitosis-ldm` command, timed; `extra` goes into its JSON as it is."""
    seconds, _ = run([sys.executable, "-m", "mitosis_ldm", *args], logs / f"{name}.log")
    return {**extra, "wall_s": round(seconds, 1)}


def transitions(pipeline: Path, seeds: int, out: Path, logs: Path, name: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "mitosis_ldm", "transitions", "--pipeline", str(pipeline), "--seeds", f"0-{seeds - 1}",
           "--conditions", "0:1:11", "--seeds-per-batch", "16", "--out", str(out), "--overwrite"]
    seconds, text = run(cmd, logs / f"{name}.log", env)
    found = re.search(r"\(([0-9.]+) s per transition", text)
    return {"seeds": seeds, "wall_s": round(seconds, 1), "s_per_transition": float(found.group(1)) if found else None}


def main(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, type=Path, help="a labelled patch dataset (the demo's synth)")
    parser.add_argument("--root", required=True, type=Path, help="where the short runs go")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per training stage")
    parser.add_argument("--autoencoder-steps", type=int, help="the autoencoder's steps, if not --steps")
    parser.add_argument("--classifier-steps", type=int, help="each ensemble member's steps, if not --steps")
    parser.add_argument("--seeds", type=int, default=64, help="transitions rendered from the trained pipeline")
    parser.add_argument("--cpu-seeds", type=int, default=8, help="the same transitions on the CPU, as the peer")
    parser.add_argument("--smoke", action="store_true",
                        help="batches of 4: checks this script on a CPU, measures nothing")
    args = parser.parse_args(argv)
    root, logs = args.root, args.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "dataset": str(args.dataset), "stages": {}}
    ae_steps = args.autoencoder_steps or args.steps
    classifier_steps = args.classifier_steps or args.steps
    gan_start = 2 * ae_steps // 3
    plan = [
        ("autoencoder", lambda: training(
            "autoencoder", "autoencoder.train", "configs/full/autoencoder.yaml",
            ["--set", f"data.datasets=[{args.dataset}]", "--set", f"loss.gan_start={gan_start}",
             "--set", "data.eval_every=0", "--set", "data.scale_patches=2048"],
            root / "autoencoder", logs, ae_steps, args.smoke)),
        ("classifier", lambda: training(
            "classifier", "classifier.train", "configs/full/classifier.yaml",
            ["--set", f"data.dataset={args.dataset}", "--set", f"ensemble.eval_every={max(1, classifier_steps // 3)}"],
            root / "classifier", logs, classifier_steps, args.smoke)),
        ("cache", lambda: command("cache", [
            "cache", "--vae", str(root / "autoencoder" / "model"), "--dataset", str(args.dataset), "--split", "train",
            "--dihedral", "--out", str(root / "latents"), "--overwrite"], logs)),
        ("diffusion", lambda: training(
            "diffusion", "diffusion.train", "configs/full/diffusion.yaml",
            ["--set", f"data.cache={root / 'latents'}"], root / "diffusion", logs, args.steps, args.smoke)),
        ("transitions", lambda: transitions(root / "diffusion" / "model", args.seeds, root / "transitions", logs,
                                            "transitions")),
        # the GPU paths that sampling does not take: encoding real patches, inversion, the posterior's batches
        ("real2gen", lambda: command("real2gen", [
            "real2gen", "--pipeline", str(root / "diffusion" / "model"), "--input", str(args.dataset), "--split",
            "test", "--limit", "16", "--conditions", "0:1:5", "--out", str(root / "real2gen"), "--overwrite"], logs,
            patches=16)),
        ("posterior", lambda: command("posterior", [
            "posterior", "--pipeline", str(root / "diffusion" / "model"), str(args.dataset), "--split", "test",
            "--limit", "64", "--draws", "32", "--quiet", "--out", str(root / "posterior"), "--overwrite"], logs,
            patches=64, draws=32)),
        ("score", lambda: command("score", [
            "score", "--classifier", str(root / "classifier" / "model"), str(root / "transitions"),
            str(root / "real2gen"), "--quiet", "--out", str(root / "scores.csv"), "--overwrite"], logs)),
        # the demo's report settings: the full ones (configs/full/report.yaml) bootstrap far longer on the CPU side
        ("report", lambda: command("report", [
            "report", "--transitions", str(root / "transitions"), "--real2gen", str(root / "real2gen"),
            "--posterior", str(root / "posterior"), "--classifier", str(root / "classifier" / "model"),
            "--dataset", str(args.dataset), "--quiet", "--out", str(root / "report"), "--overwrite"], logs)),
        ("transitions_cpu_peer", lambda: transitions(root / "diffusion" / "model", args.cpu_seeds,
                                                     root / "transitions-cpu", logs, "transitions-cpu",
                                                     {"CUDA_VISIBLE_DEVICES": ""})),
    ]
    for name, stage in plan:
        try:
            out["stages"][name] = stage()
        except Exception as error:  # report what ran; the later stages need the earlier ones
            out["stages"][name] = {"failed": str(error)}
            print(json.dumps({name: out["stages"][name]}), flush=True)
            break
        print(json.dumps({name: out["stages"][name]}), flush=True)
        (root / "full_profile.json").write_text(json.dumps(out, indent=2))  # so far: a time limit may end the run
    ae = out["stages"].get("autoencoder", {})
    if "s_per_step" in ae:
        ae["s_per_step_before_gan"] = step_rate(root / "autoencoder", 10, gan_start)
        ae["s_per_step_with_gan"] = step_rate(root / "autoencoder", gan_start + 10)
    print(json.dumps(out, indent=2))
    (root / "full_profile.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
