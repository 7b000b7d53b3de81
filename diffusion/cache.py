"""The latent cache: patch datasets encoded once by the VAE, so diffusion training never runs it.

    mitosis-ldm cache --vae runs/demo/autoencoder/model --dataset runs/demo/data/synth \
        --dataset runs/demo/data/cmu --out runs/demo/latents [--mode mean|sample] [--dihedral] \
        [--split train] [--overwrite]
    python -m diffusion.cache ...   (the same)

`--split` (repeatable) encodes only those splits: diffusion trains on the
train split, so the demo skips encoding val/test.

Folder layout:
- `latents.npy`  float16 (N, V, C, h, w), already multiplied by the VAE's
  scaling factor; V = 1, or 8 with `--dihedral` (the flips/rotations by 90
  degrees of each patch, encoded separately: a VAE is not exactly equivariant);
- `labels.npy` float32 (N,) soft label, NaN for unlabelled rows (e.g. real CMU
  nuclei); `hard_labels.npy` float32 (N,) (NaN when unlabelled);
  `dataset_ids.npy` int16 (N,) index into `datasets`; `splits.npy` uint8 (N,)
  0 train / 1 val / 2 test; `rows.npy` int64 (N,) row in its dataset;
- `vae/`        a copy of the VAE that made the latents (the pipeline ships it);
- `cache.json`  {"format": "mitosis-ldm/latents", vae_hash, latent_scale,
  latent_shape, mode, dihedral, splits (null = all), datasets: [{path, content_hash, count}]}.

A cache made with another VAE or from changed datasets is refused with one
line naming both hashes (`check_cache`).
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from mitosis_ldm.artifacts import AUTOENCODER, FORMAT, LATENTS, expect_artifact, load_part, strict_loader
from mitosis_ldm.errors import UserError, check_seed, user_errors
from mitosis_ldm.hashing import hash_folder
from mitosis_ldm.io import atomic_dir, check_new_output, read_json, read_npy, save_npy, write_json
from mitosis_ldm.launch import process_state

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def vae_hash(vae_dir) -> str:
    return hash_folder(vae_dir)


def load_vae(vae_dir, flag: str = "--vae"):
    from diffusers import AutoencoderKL

    path = expect_artifact(vae_dir, AUTOENCODER, flag)
    vae = load_part(path, "the autoencoder", strict_loader(AutoencoderKL))
    return path, vae.eval()


def dihedral(images: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7) of the 8 flips/rotations by 90 degrees of (B, 3, H, W) images."""
    out = torch.rot90(images, k % 4, dims=(2, 3))
    return out.flip(3) if k >= 4 else out


@torch.no_grad()
def encode_images(vae, images_uint8: np.ndarray, mode: str = "mean", generator: torch.Generator | None = None,
                  batch_size: int = 128) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> scaled latents float32 (N, C, h, w), on the VAE's device (`mode="sample"` draws its
    noise from `generator`, a CPU one: the same draw on every device)."""
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    device = next(vae.parameters()).device
    out = []
    for start in range(0, len(images_uint8), batch_size):
        block = torch.from_numpy(np.ascontiguousarray(images_uint8[start: start + batch_size])).to(device)
        x = block.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, H, W) in [-1, 1]
        dist = vae.encode(x).latent_dist
        z = dist.mean if mode == "mean" else dist.sample(generator)
        out.append((z.float() - shift) * scale)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents (N, C, h, w) -> uint8 (N, H, W, 3)."""
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    # channels-last input: oneDNN's convolutions run about 20 % faster in that layout on CPU (11 demo frames:
    # 216 -> 176 ms eager), and every decode in the project takes the same path, so results agree bit for bit
    z = (latents.float() / scale + shift).contiguous(memory_format=torch.channels_last)
    x = vae.decode(z).sample  # (N, 3, H, W) in ~[-1, 1]
    return ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def build_cache(vae_dir, datasets: list, out, mode: str = "mean", use_dihedral: bool = False,
                overwrite: bool = False, seed: int = 0, progress: bool = True, splits: list[str] | None = None) -> Path:
    """`splits`: encode only these splits' rows (None: every row)."""
    from patches.dataset import PatchDataset

    check_new_output(out, overwrite)
    if mode not in ("mean", "sample"):
        raise UserError(f"--mode: must be mean or sample, got '{mode}'")
    if not datasets:
        raise UserError("--dataset: give at least one patch dataset")
    vae_dir, vae = load_vae(vae_dir)
    vae.to(process_state().device)  # most of the work: a GPU when there is one
    generator = torch.Generator().manual_seed(seed)
    wanted = list(splits) if splits else None  # `splits` below collects each row's split code
    for name in wanted or []:
        if name not in SPLIT_CODES:
            raise UserError(f"--split: must be one of {', '.join(SPLIT_CODES)}, got '{name}'")
    loaded = [PatchDataset(d, split=wanted) for d in datasets]  # validates every dataset before any work
    if not sum(len(ds) for ds in loaded):
        raise UserError(f"--split: the datasets hold no rows in split(s) {', '.join(wanted or [])}")
    sizes = {ds.patch_size for ds in loaded}
    if len(sizes) != 1:
        raise UserError(f"--dataset: patch sizes differ ({sorted(sizes)}); one cache holds one patch size")
    latents, labels, hard, ids, splits, rows = [], [], [], [], [], []
    variants = range(8) if use_dihedral else range(1)
    for d, ds in enumerate(loaded):
        images = ds.uint8()  # (n, P, P, 3) in row order
        per_variant = []
        for k in variants:
            x = torch.from_numpy(images).permute(0, 3, 1, 2)
            x = dihedral(x, k).permute(0, 2, 3, 1).contiguous().numpy()
            per_variant.append(encode_images(vae, x, mode, generator))
            if progress:
                print(f"encoded {ds.root} variant {k + 1}/{len(variants)} ({len(x)} patches)", flush=True)
        latents.append(torch.stack(per_variant, 1).half().cpu().numpy())  # (n, V, C, h, w)
        labels.append(ds.soft_labels)
        hard.append(ds.hard_labels)
        ids.append(np.full(len(ds), d, np.int16))
        splits.append(np.array([SPLIT_CODES.get(ds.rows[i].get("split", "train"), 0) for i in ds.indices], np.uint8))
        rows.append(ds.indices.astype(np.int64))
    latents_all = np.concatenate(latents)
    if not np.isfinite(latents_all).all():
        raise UserError(f"{vae_dir}: the VAE produced non-finite latents (overflowing float16?)")
    info = {
        "format": FORMAT[LATENTS],
        "vae": str(vae_dir),
        "vae_hash": vae_hash(vae_dir),
        "latent_scale": float(vae.config.scaling_factor),
        "latent_shape": list(latents_all.shape[2:]),
        "mode": mode,
        "dihedral": use_dihedral,
        "splits": wanted,
        "count": int(len(latents_all)),
        "datasets": [{"path": str(ds.root), "content_hash": ds.meta.get("content_hash"), "count": len(ds),
                      "patch_size": ds.patch_size} for ds in loaded],
    }
    with atomic_dir(out, overwrite) as tmp:
        save_npy(tmp / "latents.npy", latents_all)
        save_npy(tmp / "labels.npy", np.concatenate(labels).astype(np.float32))
        save_npy(tmp / "hard_labels.npy", np.concatenate(hard).astype(np.float32))
        save_npy(tmp / "dataset_ids.npy", np.concatenate(ids))
        save_npy(tmp / "splits.npy", np.concatenate(splits))
        save_npy(tmp / "rows.npy", np.concatenate(rows))
        shutil.copytree(vae_dir, tmp / "vae")
        write_json(tmp / "cache.json", info)
    return Path(out)


class LatentCache:
    """A cache folder read back: arrays in memory (small: 4x16x16 float16 is 2 KB a patch)."""

    def __init__(self, root):
        self.root = expect_artifact(root, LATENTS, "data.cache")
        self.info = read_json(self.root / "cache.json", "cache.json")
        for name in ("latents.npy", "labels.npy", "hard_labels.npy", "dataset_ids.npy", "splits.npy", "vae"):
            if not (self.root / name).exists():
                raise UserError(f"{self.root / name}: missing from the latent cache; rebuild it with "
                                f"mitosis-ldm cache --overwrite")
        self.latents = read_npy(self.root / "latents.npy")  # (N, V, C, h, w) float16
        self.labels = read_npy(self.root / "labels.npy")
        self.hard_labels = read_npy(self.root / "hard_labels.npy")
        self.dataset_ids = read_npy(self.root / "dataset_ids.npy")
        self.splits = read_npy(self.root / "splits.npy")
        self._check()

    def _check(self) -> None:
        """What training reads must hold together: one row per latent, labels in [0, 1] (or NaN), known split
        codes, and cache.json's latent scale and source datasets (a damaged one failed mid-start as an IndexError
        or KeyError)."""
        where = self.root / "latents.npy"
        if self.latents.ndim != 5 or not np.issubdtype(self.latents.dtype, np.floating):
            raise UserError(f"{where}: expected floats (N, V, C, h, w), got {self.latents.dtype} {self.latents.shape}")
        n = len(self.latents)
        for name in ("labels", "hard_labels", "dataset_ids", "splits"):
            array = getattr(self, name)
            if array.ndim != 1 or len(array) != n:
                count = len(array) if array.ndim == 1 else array.shape
                raise UserError(f"{self.root / (name + '.npy')}: {count} entries, latents.npy has {n}")
        for name in ("labels", "hard_labels"):
            values = getattr(self, name).astype(np.float64)
            if ((values < 0) | (values > 1)).any():
                raise UserError(f"{self.root / (name + '.npy')}: labels outside [0, 1]")
        if not np.isin(self.splits, list(SPLIT_CODES.values())).all():
            raise UserError(f"{self.root / 'splits.npy'}: split codes other than {sorted(SPLIT_CODES.values())}")
        info, path = self.info, self.root / "cache.json"
        if not isinstance(info, dict):
            raise UserError(f"{path}: top level must be a JSON object")
        scale = info.get("latent_scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise UserError(f"{path}: field 'latent_scale' must be a finite number > 0, got {str(scale)[:40]!r}")
        datasets = info.get("datasets")
        if not isinstance(datasets, list) or not datasets or not all(
                isinstance(d, dict) and isinstance(d.get("patch_size"), int) and not isinstance(d["patch_size"], bool)
                and d["patch_size"] > 0 and isinstance(d.get("path"), str) for d in datasets):
            raise UserError(f"{path}: field 'datasets' must list the source datasets, each with its path and "
                            f"patch_size")
        if not np.isin(self.dataset_ids, np.arange(len(datasets))).all():
            raise UserError(f"{self.root / 'dataset_ids.npy'}: ids beyond the {len(datasets)} dataset(s) of "
                            f"cache.json")

    @property
    def vae_dir(self) -> Path:
        return self.root / "vae"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.latents.shape[2:])


def check_cache(cache_dir, vae_dir=None, datasets: list | None = None) -> None:
    """Refuse a cache whose VAE or datasets are not the ones the config names (one line)."""
    info = read_json(Path(cache_dir) / "cache.json", "cache.json")
    if vae_dir:
        vae_dir = expect_artifact(vae_dir, AUTOENCODER, "data.vae")
        want = vae_hash(vae_dir)
        if info.get("vae_hash") != want:
            raise UserError(f"{cache_dir}: latent cache was made with another VAE (cache.json vae_hash "
                            f"{str(info.get('vae_hash'))[:12]}, {vae_dir} has {want[:12]}); rebuild it with "
                            f"mitosis-ldm cache --overwrite")
    if datasets:
        from patches.dataset import read_meta

        cached = {Path(d["path"]).resolve(): d.get("content_hash") for d in info.get("datasets", [])}
        for d in datasets:
            meta = read_meta(d)
            key = Path(d).resolve()
            if key not in cached:
                raise UserError(f"{cache_dir}: latent cache does not hold dataset {d} (field 'datasets'); "
                                f"rebuild it with mitosis-ldm cache --overwrite")
            if cached[key] != meta.get("content_hash"):
                raise UserError(f"{cache_dir}: dataset {d} changed since the latent cache was made "
                                f"(content_hash differs); rebuild it with mitosis-ldm cache --overwrite")


@user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(prog="mitosis-ldm cache", description="Encode patch datasets into a latent cache.")
    parser.add_argument("--vae", required=True, help="autoencoder folder (diffusers AutoencoderKL) or its run folder")
    parser.add_argument("--dataset", action="append", required=True, help="patch dataset folder (repeatable)")
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--mode", choices=["mean", "sample"], default="mean",
                        help="store posterior means (default) or one posterior sample per patch")
    parser.add_argument("--dihedral", action="store_true", help="also encode the 8 flips/rotations of each patch")
    parser.add_argument("--seed", type=int, default=0, help="seed for --mode sample")
    parser.add_argument("--split", action="append", choices=list(SPLIT_CODES),
                        help="encode only this split (repeatable; default: all rows)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    args = parser.parse_args(argv)
    check_seed(args.seed)
    out = build_cache(args.vae, args.dataset, args.out, args.mode, args.dihedral, args.overwrite, args.seed,
                      splits=args.split)
    info = read_json(out / "cache.json")
    print(f"wrote {out}: {info['count']} patches x {8 if args.dihedral else 1} variants, latents "
          f"{tuple(info['latent_shape'])} float16, scale {info['latent_scale']:.4g}")


if __name__ == "__main__":
    main()
