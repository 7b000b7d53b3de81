"""Learning curve of the autoencoder: held-out PSNR/SSIM against training time, through the real entry point.

    python bench/autoencoder_learning_curve.py [--config configs/demo/autoencoder.yaml] \
        [--datasets runs/demo/data/synth,runs/demo/data/cmu] [--steps 2000] [--every 250] [--split test] [--threads N]

Runs `accelerate launch -m autoencoder.train` with the held-out measurement
every `--every` steps (its time is excluded from `train_time_s`), then prints
JSON: one point per measurement plus the final one. `--set KEY=VALUE` passes
config overrides through (e.g. --set model.latent_channels=8).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mitosis_ldm.launch import accelerate_launch, cpu_threads  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo/autoencoder.yaml")
    parser.add_argument("--datasets", default="runs/demo/data/synth,runs/demo/data/cmu")
    parser.add_argument("--steps", type=int, help="override train.max_steps")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--split", default="test", help="held-out split measured (test: never seen in training)")
    parser.add_argument("--limit", type=int, default=256, help="held-out patches per dataset")
    parser.add_argument("--out", help="run folder to keep (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=cpu_threads(),
                        help="CPU threads for training (default: every core)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "run"
        sets = [f"data.datasets=[{args.datasets}]", f"data.eval_every={args.every}", f"data.eval_split={args.split}",
                f"data.eval_limit={args.limit}", *args.overrides]
        if args.steps:
            sets.append(f"train.max_steps={args.steps}")
        cmd = accelerate_launch("autoencoder.train", "--config", args.config, "--out", out, "--overwrite",
                                threads=args.threads)
        for item in sets:
            cmd += ["--set", item]
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        points = [{"step": r["step"], "train_time_s": round(r["train_time_s"], 1),
                   **{k: round(v, 4) for k, v in r.items() if k.startswith(("psnr/", "ssim/"))}}
                  for r in records if "train_time_s" in r]
        config = (out / "config.yaml").read_text()
    result = {"config": args.config, "threads": args.threads, "overrides": sets, "split": args.split, "points": points,
              "final": points[-1] if points else None, "resolved_config": config}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
