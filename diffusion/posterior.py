"""The generative label posterior: how mitotic the diffusion model thinks a real nucleus is.

    mitosis-ldm posterior --pipeline runs/demo/diffusion/model INPUT... --grid 0:1:11 --draws 32 --out DIR
        [--calibrate DATASET --split val [--calibrate-limit N] [--t-bands B]] [--temperature-from DIR]
    accelerate launch --multi_gpu --num_processes 2 -m diffusion.posterior ...   (inputs split across processes)

A diffusion classifier (Li et al. 2023) for a continuous label: each patch is
encoded by the pipeline's VAE, noised at `draws` pairs (t_j, eps_j) with t
evenly spaced over the schedule, and denoised under every grid label y (and
the null label) in ONE batched UNet call per pair, the same eps for every
label. The mean error per label, through a temperature fitted on the experts'
votes (diffusion/posterior_fit.py), gives p(y | x) under a uniform prior.
eps is keyed by the patch's id and `--seed`, so a patch gets the same noise
however inputs are ordered or split across processes.

INPUT is any mix of image files, folders, patch datasets and DATASET:ID, as
for `score`. Writes DIR/posterior.csv (id, p_y=<y> per grid value, expected_y,
map_y, posterior_std, uncond_error, name, label), DIR/posterior.json (settings,
grid, timesteps, seed, calibration, pipeline hash) and DIR/errors.npy (N,
draws, grid + 1) float32, so a calibration can be refitted without the UNet.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from mitosis_ldm.artifacts import PATCHES, artifact_kind
from mitosis_ldm.errors import UserError, check_at_least, check_seed, user_errors
from mitosis_ldm.io import atomic_dir, check_new_output, read_json, save_npy, write_json, write_text
from mitosis_ldm.launch import process_state, release_processes

from .pipeline import MitosisPipeline
from .sampling_args import parse_conditions
from .posterior_fit import Calibration, fit_calibration, log_posterior, parse_votes, scale_heuristic, summaries

ERROR_SPACES = ("epsilon", "v_prediction", "sample")


# -- the measurement ------------------------------------------------------------------------

def draw_timesteps(draws: int, num_train_timesteps: int) -> np.ndarray:
    """`draws` timesteps evenly spaced over the schedule, each in the middle of its stratum."""
    return np.floor((np.arange(draws) + 0.5) * num_train_timesteps / draws).astype(np.int64)


def patch_seed(patch_id: str, seed: int) -> int:
    return (zlib.crc32(patch_id.encode()) + 1_000_003 * int(seed)) % (2 ** 63)


def patch_noise(patch_id: str, seed: int, draws: int, shape, labels: int = 0) -> torch.Tensor:
    """(draws, C, h, w) noise for one patch, or (draws, labels, C, h, w) fresh per label (the naive variant)."""
    gen = torch.Generator().manual_seed(patch_seed(patch_id, seed))
    return torch.randn((draws, *([labels] if labels else []), *shape), generator=gen)


def in_space(pred: torch.Tensor, noisy: torch.Tensor, alpha: torch.Tensor, prediction_type: str, space: str):
    """A model prediction of `prediction_type` re-expressed as `space` (eps, v or the clean latent)."""
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == space:
        return pred
    if prediction_type == "v_prediction":
        eps, x0 = a * pred + s * noisy, a * noisy - s * pred
    elif prediction_type == "epsilon":
        eps, x0 = pred, (noisy - s * pred) / a
    else:  # sample
        eps, x0 = (noisy - a * pred) / s, pred
    return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[space]


@torch.no_grad()
def denoising_errors(pipe: MitosisPipeline, latents: torch.Tensor, ids: list[str], grid, draws: int, seed: int,
                     space: str, guidance: float = 1.0, shared_noise: bool = True,
                     patches_per_call: int = 16, progress=None) -> np.ndarray:
    """Mean squared error (N, draws, K + 1) of the prediction under each grid label and, last, the null label.

    Shared noise: for each (t_j, eps_j) every label of a patch sees the same noisy latent, all labels of
    `patches_per_call` patches in one UNet call. Naive (`shared_noise=False`): fresh eps per label and one
    call per label, as a first implementation would do.
    """
    scheduler = pipe.scheduler
    kind = scheduler.config.prediction_type
    device = pipe.device  # the noise is drawn on the CPU (the same on every device) and moved there
    timesteps = draw_timesteps(draws, scheduler.config.num_train_timesteps).tolist()  # ints: index without a sync
    alphas = scheduler.alphas_cumprod.float().to(device)
    labels = torch.tensor([*map(float, grid), float("nan")], device=device)  # (K+1,), NaN = null
    k1 = len(labels)
    emb = pipe.label_embedder(labels)  # (K+1, D)
    shape = tuple(latents.shape[1:])
    out = np.zeros((len(latents), draws, k1), np.float32)
    for start in range(0, len(latents), patches_per_call):
        x0 = latents[start: start + patches_per_call].float().to(device)  # (P, C, h, w)
        p = len(x0)
        names = ids[start: start + p]
        if shared_noise:
            noise = torch.stack([patch_noise(n, seed, draws, shape) for n in names]).to(device)  # (P, D, C, h, w)
        else:
            noise = torch.stack([patch_noise(n, seed, draws, shape, k1) for n in names]).to(device)  # (P, D, K+1, ...)
        for j, step in enumerate(timesteps):
            alpha = alphas[step]
            if shared_noise:
                eps = noise[:, j, None].expand(p, k1, *shape)  # (P, K+1, C, h, w): one eps for every label
            else:
                eps = noise[:, j]
            clean = x0[:, None].expand(p, k1, *shape)
            noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * eps  # what scheduler.add_noise computes
            if shared_noise:
                t = torch.full((p * k1,), step, dtype=torch.long, device=device)
                pred = pipe.unet(noisy.reshape(p * k1, *shape), t,
                                 class_labels=emb.repeat(p, 1)).sample.reshape(p, k1, *shape)
            else:
                t = torch.full((p,), step, dtype=torch.long, device=device)
                pred = torch.stack([pipe.unet(noisy[:, g], t, class_labels=emb[g].expand(p, -1)).sample
                                    for g in range(k1)], dim=1)
            cond, uncond = pred[:, :-1], pred[:, -1:]
            pred = torch.cat([uncond + guidance * (cond - uncond), uncond], dim=1)  # (P, K+1, C, h, w)
            target = {"epsilon": eps, "sample": clean,
                      "v_prediction": alpha.sqrt() * eps - (1 - alpha).sqrt() * clean}[space]
            mine = in_space(pred, noisy, alpha, kind, space)
            out[start: start + p, j] = ((mine - target) ** 2).mean(dim=(2, 3, 4)).float().cpu().numpy()
        if progress is not None:
            progress(p)
    return out


def split_errors(pipe, images: np.ndarray, ids: list[str], settings: dict, quiet: bool = False) -> np.ndarray:
    """Errors for every input, the inputs split across accelerate processes, gathered in input order."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = process_state()
    with state.split_between_processes(list(range(len(images)))) as mine:
        bar = tqdm(total=len(mine), desc="posterior", unit="patch", disable=quiet or not state.is_main_process)
        local = np.zeros((0, settings["draws"], len(settings["grid"]) + 1), np.float32)
        if mine:
            latents = pipe.encode(images[mine[0]: mine[-1] + 1])  # contiguous blocks
            local = denoising_errors(pipe, latents, ids[mine[0]: mine[-1] + 1], settings["grid"], settings["draws"],
                                     settings["seed"], settings["error_space"], settings["guidance"],
                                     patches_per_call=settings["patches_per_call"], progress=bar.update)
        bar.close()
    if state.num_processes == 1:
        return local
    parts = gather_object([(state.process_index, local)])
    return np.concatenate([part for _, part in sorted(parts, key=lambda item: item[0])])


# -- inputs ---------------------------------------------------------------------------------

def check_size(name: str, image: np.ndarray, size: tuple) -> None:
    if image.shape != size:
        raise UserError(f"{name}: image is {image.shape[1]}x{image.shape[0]} but the pipeline's VAE takes "
                        f"{size[1]}x{size[0]} patches")


def gather_patches(inputs: list[str], size: tuple, split: str | None, limit: int | None):
    """ids (the dataset's patch id, or the file path), names, images, soft labels of every input."""
    from patches.inputs import gather_images

    ids, names, images, labels = [], [], [], []
    for raw in inputs:
        root = raw.rsplit(":", 1)[0] if not Path(raw).exists() and ":" in raw else raw
        prefix = f"{Path(root)}:" if artifact_kind(root) == PATCHES else None
        for item in gather_images([raw], split=split, limit=limit):
            check_size(item.name, item.image, size)
            ids.append(item.name[len(prefix):] if prefix and item.name.startswith(prefix) else item.name)
            names.append(item.name)
            images.append(item.image)
            labels.append(item.label)
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"INPUT: patch id '{dup}' appears twice; give each patch once")
    return ids, names, np.stack(images), np.array(labels, np.float64)


def calibration_set(dataset: str, split: str, limit: int | None, size: tuple):
    """Labelled patches of `split` with their votes: ids, images, mitotic votes k and expert counts n."""
    from patches.dataset import PatchDataset, read_meta

    read_meta(dataset)  # one line when it is not a patch dataset
    ds = PatchDataset(dataset, split=split, labelled_only=True)
    if len(ds) == 0:
        raise UserError(f"{Path(dataset) / 'labels.csv'}: no labelled rows in split '{split}' (--calibrate)")
    positions = np.arange(len(ds))
    if limit is not None and limit < len(ds):  # an even spread over the split, deterministic
        positions = np.unique(np.linspace(0, len(ds) - 1, limit).round().astype(int))
    rows = [ds.rows[i] for i in ds.indices[positions]]
    where = Path(dataset) / "labels.csv"
    votes = np.array([parse_votes(r.get("votes", ""), float(s), str(where))
                      for r, s in zip(rows, ds.soft_labels[positions])], np.float64)
    images = ds.uint8(positions)
    check_size(f"{dataset}:{rows[0]['id']}", images[0], size)
    return [r["id"] for r in rows], images, votes[:, 0], votes[:, 1]


def calibration_from(folder, settings: dict, pipe_hash: str) -> Calibration:
    path = Path(folder) / "posterior.json"
    if not path.exists():
        raise UserError(f"{path}: not found (--temperature-from expects a posterior folder)")
    info = read_json(path, "posterior.json")
    for key in ("grid", "error_space", "guidance"):
        if info.get("settings", {}).get(key) != settings[key]:
            raise UserError(f"{path}: field 'settings.{key}' is {info.get('settings', {}).get(key)!r} but this run "
                            f"uses {settings[key]!r}; a temperature only holds for the settings it was fitted with")
    if info.get("pipeline_hash") != pipe_hash:
        raise UserError(f"{path}: field 'pipeline_hash' names another pipeline; calibrate this one")
    return Calibration.from_json(info.get("calibration", {}), str(path))


# -- output ---------------------------------------------------------------------------------

def posterior_rows(ids, names, labels, errors, settings, cal: Calibration, num_train_timesteps: int):
    grid = settings["grid"]
    prob = np.exp(log_posterior(errors, settings["timesteps"], num_train_timesteps, cal))  # (N, K)
    summary = summaries(prob, grid)
    header = ["id", *[f"p_y={g:g}" for g in grid], "expected_y", "map_y", "posterior_std", "uncond_error",
              "name", "label"]
    rows = [[pid, *prob[i], summary["expected_y"][i], summary["map_y"][i], summary["posterior_std"][i],
             float(errors[i, :, -1].mean()), name, labels[i]] for i, (pid, name) in enumerate(zip(ids, names))]
    return header, rows


def csv_text(header, rows) -> str:
    import csv
    import io

    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "" if not math.isfinite(v) else f"{float(v):.6g}"
        return str(v)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[fmt(v) for v in row] for row in rows])
    return buffer.getvalue()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mitosis-ldm posterior", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="diffusion pipeline folder (or its run folder)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders, patch datasets or DATASET:ID")
    p.add_argument("--split", choices=["train", "val", "test"], help="only this split of patch-dataset inputs")
    p.add_argument("--limit", type=int, help="at most this many patches per patch-dataset input")
    p.add_argument("--grid", default="0:1:11", help="label grid, START:STOP:COUNT or a list (default 0:1:11)")
    p.add_argument("--draws", type=int, default=32, help="(t, eps) pairs per patch (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--error", choices=ERROR_SPACES, default="epsilon",
                   help="space of the error (default epsilon: on the demo it calibrates best, docs/posterior.md)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance of the conditional prediction (default 1)")
    p.add_argument("--calibrate", metavar="DATASET", help="fit the temperature on this labelled patch dataset")
    p.add_argument("--calibrate-split", "--split-calibrate", dest="calibrate_split", default="val",
                   choices=["train", "val", "test"], help="split of --calibrate (default val)")
    p.add_argument("--calibrate-limit", type=int, help="at most this many --calibrate patches (evenly spread)")
    p.add_argument("--t-bands", type=int, default=3,
                   help="fit one weight per this many timestep bands (default 3; 1: a single temperature)")
    p.add_argument("--temperature-from", metavar="DIR", help="use the calibration stored in this posterior folder")
    p.add_argument("--temperature", type=float, help="a fixed temperature (uncalibrated)")
    p.add_argument("--patches-per-call", type=int, default=16, help="patches in one UNet call (x grid + 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice; 1 on a busy machine)")
    p.add_argument("--out", required=True, help="posterior folder to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(args) -> None:
    check_at_least(args.draws, "--draws")
    check_seed(args.seed)
    for flag in ("limit", "calibrate_limit", "patches_per_call", "t_bands", "threads"):
        check_at_least(getattr(args, flag), f"--{flag.replace('_', '-')}")
    if args.temperature is not None and not args.temperature > 0:
        raise UserError(f"--temperature: must be > 0, got {args.temperature:g}")
    if not args.guidance >= 0:
        raise UserError(f"--guidance: must be >= 0, got {args.guidance:g}")
    given = [f for f, v in (("--calibrate", args.calibrate), ("--temperature-from", args.temperature_from),
                            ("--temperature", args.temperature)) if v is not None]
    if len(given) > 1:
        raise UserError(f"{given[1]}: give only one of --calibrate, --temperature-from and --temperature")
    if not args.inputs and not args.calibrate:
        raise UserError("INPUT: give patches to judge, or --calibrate DATASET")


@user_errors
def main(argv=None):
    args = parser().parse_intermixed_args(argv)
    check_args(args)
    grid = parse_conditions(args.grid, "--grid")
    if len(grid) < 2:  # one label is a posterior of 1 everywhere (parse_conditions refuses a repeated one)
        raise UserError(f"--grid: needs at least 2 labels, none repeated, got {args.grid}")
    check_new_output(args.out, args.overwrite)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        run(args, grid)
    finally:  # tests call main() in-process: leave the thread count as it was
        torch.set_num_threads(threads)


def run(args, grid) -> None:
    state = process_state()
    pipe = MitosisPipeline.from_pretrained(args.pipeline).to(state.device)  # a GPU when there is one, one a process
    size = pipe.image_shape
    num_t = int(pipe.scheduler.config.num_train_timesteps)
    settings = {"grid": grid, "draws": args.draws, "seed": args.seed, "guidance": args.guidance,
                "error_space": args.error,
                "prediction_type": pipe.scheduler.config.prediction_type, "timesteps_spacing": "stratified midpoints",
                "timesteps": draw_timesteps(args.draws, num_t).tolist(), "num_train_timesteps": num_t,
                "patches_per_call": args.patches_per_call, "noise": "shared across the grid, keyed by patch id + seed",
                "prior": "uniform over the grid"}
    # read and check every input before the UNet runs
    inputs = gather_patches(args.inputs, size, args.split, args.limit) if args.inputs else None
    cal_set = calibration_set(args.calibrate, args.calibrate_split, args.calibrate_limit, size) \
        if args.calibrate else None
    cal = calibration_from(args.temperature_from, settings, pipe.model_hash) if args.temperature_from else None
    is_main = state.is_main_process
    t0 = time.time()
    cal_errors = None
    if cal_set is not None:
        cal_ids, cal_images, mitotic, experts = cal_set
        cal_errors = split_errors(pipe, cal_images, cal_ids, settings, args.quiet)
        cal = fit_calibration(cal_errors, settings["timesteps"], num_t, grid, mitotic, experts, args.t_bands,
                              {"dataset": str(args.calibrate), "split": args.calibrate_split})
    if inputs is not None:
        ids, names, images, labels = inputs
        errors = split_errors(pipe, images, ids, settings, args.quiet)
    else:  # --calibrate alone: the calibration set's own posterior
        ids, names = cal_set[0], [f"{args.calibrate}:{i}" for i in cal_set[0]]
        labels, errors = cal_set[2] / cal_set[3], cal_errors
    if cal is None:
        cal = Calibration(temperature=args.temperature or scale_heuristic(errors))
    seconds = time.time() - t0
    release_processes()  # the errors are gathered: no more collectives
    if not is_main:
        return
    header, rows = posterior_rows(ids, names, labels, errors, settings, cal, num_t)
    measured = len(ids) + (0 if cal_errors is None or inputs is None else len(cal_errors))
    info = {"format": "mitosis-ldm/posterior", "settings": settings, "grid": grid, "draws": args.draws,
            "seed": args.seed, "temperature": cal.temperature, "calibration": cal.to_json(),
            "pipeline": str(pipe.path), "pipeline_hash": pipe.model_hash, "inputs": args.inputs,
            "split": args.split, "patches": len(ids), "seconds": round(seconds, 3),
            "patches_per_s": round(measured / seconds, 3) if seconds > 0 else None}
    with atomic_dir(args.out, args.overwrite) as tmp:
        write_text(tmp / "posterior.csv", csv_text(header, rows))
        write_json(tmp / "posterior.json", info)
        save_npy(tmp / "errors.npy", errors)
        if cal_errors is not None and inputs is not None:
            save_npy(tmp / "calibration_errors.npy", cal_errors)
    fit = cal.fit
    note = (f"temperature {cal.temperature:.4g} fitted on {fit['patches']} patches (vote NLL "
            f"{fit['nll_votes_heuristic']:.4f} -> {fit['nll_votes_fitted']:.4f})") if cal.calibrated else \
        f"temperature {cal.temperature:.4g} (uncalibrated: pass --calibrate or --temperature-from)"
    print(f"wrote {args.out}: {len(ids)} patches x {len(grid)} labels x {args.draws} draws in {seconds:.1f} s "
          f"({measured / max(seconds, 1e-9):.2f} patches/s); {note}", file=sys.stderr)


if __name__ == "__main__":
    main()
