"""The whole pipeline on the embedded default, each stage through its real entry point.

    make demo            # or: python -m mitosis_ldm.demo [--only data,autoencoder] [--root runs/demo]
                         #     [--configs configs/demo] [--seeds 256]

Stages, in order: data (synthetic benchmark + real CMU nuclei), autoencoder,
classifier, latent cache, diffusion, transitions, real2gen, score, report, study
(the reader-study page).
Training stages run under `accelerate launch`, with one thread per core. Each stage's wall time and peak
memory are printed, and the report's path at the end. The demo owns its
output folder and replaces earlier results in it.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from .errors import EXIT_INTERRUPTED, UserError, forget_handled_interrupt, signal_name, stopping_signal, user_errors
from .io import write_json
from .launch import accelerate_launch

SLIDE = "data/cache/cmu_small_region.svs"
CONFIGS = Path("configs/demo")
RECIPES = ("autoencoder", "classifier", "diffusion")  # the stages that read a recipe from the configs folder
SEEDS = 256
SELF_STOP_S = 30  # seconds a stage that saw the terminal's Ctrl-C gets to stop by itself before a SIGTERM
STOP_GRACE_S = 30  # seconds a stage gets to clean up after a SIGTERM before it is killed


def accelerate(module: str, config: str, *extra: str) -> list[str]:
    return accelerate_launch(module, "--config", config, *extra)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mitosis_ldm", *args]


def stages(root: Path, configs: Path = CONFIGS, seeds: int = SEEDS) -> list[tuple[str, list[list[str]]]]:
    r, c = str(root), str(configs)
    data = f"{r}/data"
    return [
        ("data", [
            cli("data", "synth", "--out", f"{data}/synth", "--n", "6000", "--size", "64", "--experts", "3",
                "--seed", "0", "--overwrite"),
            cli("data", "detect", "--slide", SLIDE, "--out", f"{data}/cmu", "--overwrite"),
            cli("data", "inspect", f"{data}/synth"),
            cli("data", "inspect", f"{data}/cmu"),
        ]),
        ("autoencoder", [accelerate("autoencoder.train", f"{c}/autoencoder.yaml", "--set", f"out={r}/autoencoder",
                                    "--set", f"data.datasets=[{data}/synth,{data}/cmu]", "--overwrite")]),
        ("classifier", [accelerate("classifier.train", f"{c}/classifier.yaml", "--set", f"out={r}/classifier",
                                   "--set", f"data.dataset={data}/synth", "--overwrite")]),
        # the cache encodes only what diffusion trains on (its train split)
        ("cache", [cli("cache", "--vae", f"{r}/autoencoder/model", "--dataset", f"{data}/synth", "--dataset",
                       f"{data}/cmu", "--split", "train", "--out", f"{r}/latents", "--overwrite")]),
        ("diffusion", [accelerate("diffusion.train", f"{c}/diffusion.yaml", "--set", f"out={r}/diffusion",
                                  "--set", f"data.cache={r}/latents", "--overwrite")]),
        # 256 seeds: the mean score per condition then has a 95% CI of at most ±0.043 (64 seeds gave up to
        # ±0.089; docs/diffusion-studies.md); guidance schedule, steps and sampler are the pipeline's defaults
        # (configs/demo/diffusion.yaml `sample`)
        ("transitions", [cli("transitions", "--pipeline", f"{r}/diffusion/model", "--seeds", f"0-{seeds - 1}",
                             "--conditions", "0:1:11", "--seeds-per-batch", "16",
                             "--out", f"{r}/transitions", "--overwrite")]),
        ("real2gen", [cli("real2gen", "--pipeline", f"{r}/diffusion/model", "--input", f"{data}/cmu",
                          "--split", "test", "--limit", "8", "--conditions", "0:1:6", "--mode", "invert",
                          "--out", f"{r}/real2gen", "--overwrite")]),
        ("score", [cli("score", "--classifier", f"{r}/classifier/model", f"{r}/transitions", f"{r}/real2gen",
                       "--out", f"{r}/scores.csv", "--overwrite")]),
        ("report", [cli("report", "--transitions", f"{r}/transitions", "--real2gen", f"{r}/real2gen",
                        "--classifier", f"{r}/classifier/model", "--dataset", f"{data}/synth",
                        "--out", f"{r}/report", "--overwrite")]),
        # the blinded reader-study page; real2gen stays out: its inputs are CMU nuclei while the real
        # items are synthetic, so the tissue's look alone would tell generated from real
        ("study", [cli("study", "make", "--transitions", f"{r}/transitions", "--dataset", f"{data}/synth",
                       "--n-real", "40", "--n-generated", "40", "--seed", "0", "--out", f"{r}/study",
                       "--overwrite")]),
    ]


def run_stage(name: str, cmd: list[str], env: dict, again: str) -> int:
    """Run one stage command; on Ctrl-C or SIGTERM let it clean up and stop, then stop the demo quietly.

    The terminal's Ctrl-C reaches the stage too, and it is left to stop by itself: a SIGTERM on top would reach
    `accelerate launch` in the middle of stopping its own child, and it kills a child it is still waiting for. A
    SIGTERM sent to the demo (or a SIGINT sent to it alone) does not reach the stage, so it is passed on as SIGTERM.
    The stage prints its own word.
    """
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        signum = stopping_signal() or signal.SIGINT
        try:
            if signum == signal.SIGINT:
                try:
                    proc.wait(timeout=SELF_STOP_S)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=STOP_GRACE_S)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):  # a second Ctrl-C, or a stage that hangs
            proc.kill()
            proc.wait()
        forget_handled_interrupt()  # the demo exits with its own code
        # after a blank line: a stage killed mid-bar leaves no line end of its own
        print(f"\ndemo: stopped in stage '{name}'; to go on from it: {again}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum) from None


def stage_failure(returncode: int, cmd: list[str] = ()) -> str:
    """How a stage command ended: its exit code, or the signal that killed it (the stage's own error line, if any,
    is already above)."""
    if returncode == 1 and "accelerate.commands.launch" in cmd:
        # the launcher (with --quiet) exits 1 whatever ended its child, a bad recipe's exit 2 and a kill alike
        return ("failed (exit 1 from `accelerate launch`, whatever ended its training process; with no error line "
                "above, the process was killed, as the system's out-of-memory killer does)")
    if returncode > 0:
        return f"failed (exit {returncode})"
    oom = " (the system's out-of-memory killer sends it)" if -returncode == signal.SIGKILL else ""
    return f"was killed by {signal_name(-returncode)}{oom}"


def again_from(name: str, wanted: list[str], names: list[str], args) -> str:
    """The command that runs this stage and the wanted ones after it, with the demo's other options."""
    rest = [n for n in wanted if names.index(n) >= names.index(name)]
    python = os.path.relpath(sys.executable)  # `make demo` runs .venv/bin/python, which a bare `python` may not be
    parts = [python if not python.startswith("..") else sys.executable, "-m", "mitosis_ldm.demo", "--only",
             ",".join(rest)]
    if args.root != Path("runs/demo"):
        parts += ["--root", str(args.root)]
    if args.configs != CONFIGS:
        parts += ["--configs", str(args.configs)]
    if args.seeds != SEEDS:
        parts += ["--seeds", str(args.seeds)]
    return shlex.join(parts)


def peak_child_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux: the largest resident set of any finished child
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


@user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the whole mitosis-ldm pipeline on the embedded default.")
    parser.add_argument("--root", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--only", help="comma-separated stage names to run (default: all)")
    parser.add_argument("--configs", type=Path, default=CONFIGS,
                        help=f"folder of the training recipes {', '.join(r + '.yaml' for r in RECIPES)} "
                             f"(default {CONFIGS})")
    parser.add_argument("--seeds", type=int, default=SEEDS,
                        help=f"transitions rendered, one per noise seed (default {SEEDS})")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        raise UserError(f"--seeds: {args.seeds}; the report's intervals need at least 2 transitions")
    for recipe in RECIPES:
        if not (args.configs / f"{recipe}.yaml").is_file():
            raise UserError(f"{args.configs / (recipe + '.yaml')}: recipe missing (--configs needs "
                            f"{', '.join(r + '.yaml' for r in RECIPES)})")
    plan = stages(args.root, args.configs, args.seeds)
    names = [name for name, _ in plan]
    wanted = names if not args.only else [s.strip() for s in args.only.split(",")]
    for name in wanted:
        if name not in names:
            raise UserError(f"--only: unknown stage '{name}' (stages: {', '.join(names)})")
    if not Path(SLIDE).exists():
        raise UserError(f"{SLIDE}: sample slide missing; run `make setup` (or python -m mitosis_ldm.sample)")
    args.root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5"}
    timings = {}
    start = time.time()
    for name, commands in plan:
        if name not in wanted:
            continue
        print(f"\n=== stage {name} ===", flush=True)
        t0 = time.time()
        for cmd in commands:
            print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
            again = again_from(name, wanted, names, args)
            returncode = run_stage(name, cmd, env, again)
            if returncode != 0:
                # after a blank line, as when stopped: a stage killed mid-bar leaves no line end of its own
                print(f"\ndemo: stage '{name}' {stage_failure(returncode, cmd)}; to go on from it: {again}",
                      file=sys.stderr)
                raise SystemExit(returncode if returncode > 0 else 128 - returncode)  # a shell's code for a signal
        timings[name] = round(time.time() - t0, 1)
        print(f"=== stage {name}: {timings[name]:.1f} s, peak child memory so far {peak_child_rss_mb():.0f} MB ===",
              flush=True)
    total = round(time.time() - start, 1)
    summary = {"stage_seconds": timings, "total_seconds": total, "peak_child_rss_mb": round(peak_child_rss_mb())}
    write_json(args.root / "demo_timings.json", summary)
    print("\nstage times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    print(f"total {total:.1f} s; peak memory of any stage {summary['peak_child_rss_mb']} MB")
    report = args.root / "report" / "report.html"
    if report.exists():
        print(f"report: {report.resolve()}")
    r = str(args.root)
    explorer = ["mitosis-ldm", "serve", "--pipeline", f"{r}/diffusion/model", "--classifier", f"{r}/classifier/model",
                "--slides", SLIDE, "--dataset", f"{r}/data/cmu"]
    print(f"slide explorer: {shlex.join(explorer)}  (then open http://127.0.0.1:8765/)")


if __name__ == "__main__":
    main()
