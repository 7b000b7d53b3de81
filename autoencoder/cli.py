"""The autoencoder as a standalone tool: encode, decode, reconstruct, evaluate.

    mitosis-ldm vae encode      --model RUN/model IMAGES|FOLDER|DATASET[:ID] ... --out latents.safetensors
    mitosis-ldm vae encode      --model RUN/model --slide S.svs --region x,y,w,h --out region.safetensors
    mitosis-ldm vae decode      --model RUN/model latents.safetensors --out pngs/
    mitosis-ldm vae reconstruct --model RUN/model INPUTS ... --out recon/     # input | output side by side
    mitosis-ldm vae evaluate    --model RUN/model INPUTS ... --out metrics/   # PSNR, SSIM: CSV + JSON

(also `python -m autoencoder ...`). Any image whose sides are divisible by 4
works; images larger than `--tile` pixels are encoded and decoded in
overlapping, blended tiles (diffusers tiling). Latents are the posterior means,
unscaled; the sidecar JSON records the names and the model's `scaling_factor`
(multiply by it to get the unit-variance latents the diffusion stage uses).
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from pathlib import Path

import numpy as np
import torch

from mitosis_ldm.artifacts import AUTOENCODER, expect_artifact, load_part, strict_loader
from mitosis_ldm.errors import UserError, check_at_least, user_errors
from mitosis_ldm.images import contact_sheet, save_png
from mitosis_ldm.io import atomic_dir, atomic_file, check_new_output, read_json, write_json
from mitosis_ldm.shapes import List, check_shape

from .model import DOWNSAMPLE, set_tiling

LATENTS_FORMAT = "mitosis-ldm/vae-latents"


# -- model and tensors -------------------------------------------------------

def load_autoencoder(path, flag: str = "--model", tile: int = 256):
    """Check the folder is an autoencoder artifact, then `AutoencoderKL.from_pretrained` it (eval, tiling on)."""
    from diffusers import AutoencoderKL

    folder = expect_artifact(path, AUTOENCODER, flag)
    vae = load_part(folder, "the autoencoder", strict_loader(AutoencoderKL))
    vae.eval().requires_grad_(False)
    if tile % DOWNSAMPLE:
        raise UserError(f"--tile: must be divisible by {DOWNSAMPLE}, got {tile}")
    set_tiling(vae, tile)
    return vae


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def encode(vae, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> posterior means (N, C, H/4, W/4), unscaled."""
    return vae.encode(to_tensor(images)).latent_dist.mode()


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Unscaled latents (N, C, h, w) -> uint8 (N, 4h, 4w, 3)."""
    return to_uint8(vae.decode(latents.float()).sample)


def batches(shapes: list[tuple], batch: int) -> list[list[int]]:
    """Indices grouped by shape, in order, at most `batch` per group (the same grouping for every command)."""
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return [idx[s: s + batch] for idx in groups.values() for s in range(0, len(idx), batch)]


# -- inputs ------------------------------------------------------------------

def gather(args) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 image) for every input; every check happens before any output is written."""
    items: list[tuple[str, np.ndarray]] = []
    if args.inputs:
        from patches.inputs import gather_images

        items += [(it.name, it.image) for it in gather_images(args.inputs, split=args.split, limit=args.limit)]
    if getattr(args, "slide", None):
        items.append(read_slide_region(args.slide, args.region))
    elif getattr(args, "region", None):
        raise UserError("--region: needs --slide")
    if not items:
        raise UserError("no inputs: give image files, folders or patch datasets (or --slide with --region)")
    for name, image in items:
        h, w = image.shape[:2]
        if h % DOWNSAMPLE or w % DOWNSAMPLE:
            raise UserError(f"{name}: size {w}x{h} is not divisible by {DOWNSAMPLE} "
                            f"(the autoencoder downsamples by {DOWNSAMPLE}); crop or pad it")
    return items


def read_slide_region(slide: str, region: str | None) -> tuple[str, np.ndarray]:
    if not region:
        raise UserError("--slide: needs --region x,y,w,h (level-0 pixels)")
    try:
        x, y, w, h = (int(v) for v in region.split(","))
    except ValueError:
        raise UserError(f"--region: expected x,y,w,h as four integers, got '{region}'") from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise UserError(f"--region: x and y must be >= 0 and w, h > 0, got '{region}'")
    path = Path(slide)
    if not path.exists():
        raise UserError(f"{path}: slide not found")
    import openslide

    try:
        handle = openslide.OpenSlide(str(path))
    except Exception as err:  # OpenSlideUnsupportedFormatError, OpenSlideError
        raise UserError(f"{path}: cannot open slide ({type(err).__name__})") from None
    width, height = handle.dimensions
    if x + w > width or y + h > height:
        raise UserError(f"--region: {region} runs outside {path} ({width}x{height} at level 0)")
    image = np.asarray(handle.read_region((x, y), 0, (w, h)).convert("RGB"))
    return f"{path}@{x},{y},{w},{h}", image


def slug(name: str) -> str:
    base = name.rsplit(":", 1)[-1] if ":" in name and not Path(name).exists() else Path(name.split("@")[0]).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:80] or "image"


def file_names(names: list[str]) -> list[str]:
    return [f"{i:05d}-{slug(n)}.png" for i, n in enumerate(names)]


# -- latents files -----------------------------------------------------------

def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_latents(out: Path, latents: list[torch.Tensor], names: list[str], vae, model: Path) -> None:
    """`latents` (N, C, h, w) when all shapes agree, else `latents.{i}` (1, C, h, w); names in OUT.json.

    The caller has checked both outputs against --overwrite before any work."""
    from safetensors.torch import save

    shapes = {tuple(z.shape) for z in latents}
    if len(shapes) == 1:
        tensors = {"latents": torch.cat(latents).contiguous()}
    else:
        tensors = {f"latents.{i}": z.contiguous() for i, z in enumerate(latents)}
    meta = {"format": LATENTS_FORMAT, "names": names, "count": len(names),
            "shapes": [list(z.shape[1:]) for z in latents],
            "scaling_factor": float(vae.config.scaling_factor), "scaled": False, "model": str(model)}
    with atomic_file(out, "wb") as handle:
        handle.write(save(tensors, metadata={"format": LATENTS_FORMAT}))
    write_json(sidecar(out), meta)


def load_latents(path: Path, latent_channels: int) -> tuple[list[torch.Tensor], list[str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise UserError(f"{path}: latents file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())[:120]})") from None
    if "latents" in tensors:
        stacked = tensors["latents"]
        if stacked.ndim != 4:
            raise UserError(f"{path}: tensor 'latents' must be (N, C, h, w), got shape {tuple(stacked.shape)}")
        latents = list(stacked.split(1)) if len(stacked) else []  # split(1) keeps an empty batch as one tensor
    else:
        keys = [k for k in tensors if k.startswith("latents.")]
        if not keys:
            raise UserError(f"{path}: field 'latents' is missing (keys: {', '.join(sorted(tensors)) or 'none'})")
        expected = [f"latents.{i}" for i in range(len(keys))]  # as save_latents numbers them
        if sorted(keys) != sorted(expected):
            raise UserError(f"{path}: the keys of latents of several shapes must be latents.0 ... "
                            f"latents.{len(keys) - 1}, got {', '.join(sorted(keys))[:120]}")
        latents = [tensors[k] for k in expected]
    if not latents:
        raise UserError(f"{path}: holds no latents")
    for i, z in enumerate(latents):
        if z.ndim != 4 or z.shape[1] != latent_channels:
            raise UserError(f"{path}: latents have {z.shape[1] if z.ndim == 4 else '?'} channels (shape "
                            f"{tuple(z.shape)}), but the autoencoder expects {latent_channels}")
        if min(z.shape[2:]) < 1:
            raise UserError(f"{path}: latent {i} has no pixels (shape {tuple(z.shape)})")
        if not torch.isfinite(z).all():
            raise UserError(f"{path}: latent {i} holds NaN or inf values; it would decode to a blank image")
    names = [str(i) for i in range(len(latents))]
    meta_path = sidecar(path)
    if meta_path.exists():
        meta = read_json(meta_path, "latents sidecar")
        check_shape(meta, {"names": List(object)}, meta_path)
        if len(meta["names"]) != len(latents):
            raise UserError(f"{meta_path}: field 'names' lists {len(meta.get('names', []))} names for "
                            f"{len(latents)} latents")
        names = [str(n) for n in meta["names"]]
    return latents, names


# -- commands ----------------------------------------------------------------

def run_encode(vae, images: list[np.ndarray], batch: int) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * len(images)
    for idx in batches([im.shape for im in images], batch):
        z = encode(vae, np.stack([images[i] for i in idx]))
        for i, zi in zip(idx, z.split(1)):
            # the encoder hands back channels-last memory; decoding that takes another kernel path than the
            # standard layout a saved latent file loads as, so encode->decode would differ from reconstruct
            out[i] = zi.contiguous()
    return out


def run_decode(vae, latents: list[torch.Tensor], batch: int) -> list[np.ndarray]:
    out: list[np.ndarray | None] = [None] * len(latents)
    for idx in batches([z.shape for z in latents], batch):
        pixels = decode(vae, torch.cat([latents[i] for i in idx]))
        for i, px in zip(idx, pixels):
            out[i] = px
    return out


def metrics(original: np.ndarray, recon: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of one uint8 reconstruction (torchmetrics, data range 1)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a = torch.from_numpy(recon).permute(2, 0, 1)[None].double() / 255
    b = torch.from_numpy(np.array(original)).permute(2, 0, 1)[None].double() / 255
    kernel = max(3, min(11, min(original.shape[:2]) // 2 * 2 - 1))
    psnr = float(peak_signal_noise_ratio(a, b, data_range=1.0))
    ssim = float(structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel))
    return psnr, ssim


def cmd_encode(args, vae, model: Path):
    out = check_new_output(args.out, args.overwrite)
    if out.suffix != ".safetensors":
        raise UserError(f"--out: must end in .safetensors, got '{out}'")
    check_new_output(sidecar(out), args.overwrite)  # the names go beside the latents, in OUT.json
    items = gather(args)
    latents = run_encode(vae, [im for _, im in items], args.batch)
    save_latents(out, latents, [n for n, _ in items], vae, model)
    print(f"encoded {len(items)} image(s) -> {out} (+ {sidecar(out).name}); latent shape {tuple(latents[0].shape[1:])}")


def cmd_decode(args, vae, model: Path):
    check_new_output(args.out, args.overwrite)
    latents, names = load_latents(Path(args.latents), vae.config.latent_channels)
    images = run_decode(vae, latents, args.batch)
    with atomic_dir(args.out, args.overwrite) as tmp:
        for fname, image in zip(file_names(names), images):
            save_png(tmp / fname, image)
    print(f"decoded {len(images)} latent(s) -> {args.out}")


def reconstruct_inputs(args, vae):
    """The gathered inputs, their images and their encode-decode reconstructions.

    Shared by reconstruct and evaluate."""
    items = gather(args)
    images = [im for _, im in items]
    return items, images, run_decode(vae, run_encode(vae, images, args.batch), args.batch)


def cmd_reconstruct(args, vae, model: Path):
    check_new_output(args.out, args.overwrite)
    items, images, recons = reconstruct_inputs(args, vae)
    with atomic_dir(args.out, args.overwrite) as tmp:
        for fname, image, recon in zip(file_names([n for n, _ in items]), images, recons):
            save_png(tmp / fname, np.concatenate([image, recon], axis=1))  # input | reconstruction
        small = [(im, rc) for im, rc in zip(images, recons) if im.shape[0] <= 128 and im.shape[1] <= 128]
        if small:  # a contact sheet of the first 64 pairs of the most common small size
            shapes = [im.shape for im, _ in small]
            common = max(set(shapes), key=shapes.count)
            pairs = np.stack([np.concatenate([im, rc], axis=1) for im, rc in small if im.shape == common][:64])
            save_png(tmp / "sheet.png", contact_sheet(pairs, ncols=8, scale=2))
    print(f"reconstructed {len(items)} image(s) -> {args.out} (input | reconstruction)")


def cmd_evaluate(args, vae, model: Path):
    check_new_output(args.out, args.overwrite)
    items, images, recons = reconstruct_inputs(args, vae)
    rows = [(name, *metrics(im, rc)) for (name, im), rc in zip(items, recons)]
    psnr = np.array([r[1] for r in rows])
    ssim = np.array([r[2] for r in rows])
    summary = {"count": len(rows), "psnr_mean": float(psnr.mean()), "psnr_median": float(np.median(psnr)),
               "psnr_std": float(psnr.std()), "ssim_mean": float(ssim.mean()), "ssim_median": float(np.median(ssim)),
               "ssim_std": float(ssim.std()), "model": str(model), "inputs": list(args.inputs or []),
               "split": args.split, "metric_library": "torchmetrics (PSNR, Gaussian SSIM), 8-bit output"}
    with atomic_dir(args.out, args.overwrite) as tmp:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["name", "psnr", "ssim"])
        writer.writerows([(n, f"{p:.4f}", f"{s:.5f}") for n, p, s in rows])
        (tmp / "metrics.csv").write_text(buffer.getvalue())
        write_json(tmp / "metrics.json", summary)
    print(f"{len(rows)} image(s): PSNR {summary['psnr_mean']:.2f} dB (median {summary['psnr_median']:.2f}), "
          f"SSIM {summary['ssim_mean']:.4f} -> {args.out}")
    return summary


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mitosis-ldm vae", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)

    def common(p, images: bool = True):
        p.add_argument("--model", required=True, help="autoencoder folder (RUN/model) or its run folder")
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        p.add_argument("--batch", type=int, default=64, help="images per forward pass")
        p.add_argument("--tile", type=int, default=256, help="images larger than this are processed in tiles")
        if images:
            p.add_argument("inputs", nargs="*", help="image files, folders, patch datasets, DATASET:ID")
            p.add_argument("--split", choices=["train", "val", "test"], help="split of patch-dataset inputs")
            p.add_argument("--limit", type=int, help="at most this many patches per dataset input")

    enc = sub.add_parser("encode", help="images / folder / patch dataset / slide region -> latents .safetensors")
    common(enc)
    enc.add_argument("--slide", help="whole-slide image (OpenSlide) to read a region from")
    enc.add_argument("--region", help="x,y,w,h at level 0 (w and h divisible by 4)")
    dec = sub.add_parser("decode", help="latents .safetensors -> PNGs")
    common(dec, images=False)
    dec.add_argument("latents", help="a .safetensors file written by `vae encode`")
    rec = sub.add_parser("reconstruct", help="input | reconstruction side by side as PNGs (+ sheet.png)")
    common(rec)
    ev = sub.add_parser("evaluate", help="PSNR and SSIM per image (metrics.csv) and in aggregate (metrics.json)")
    common(ev)
    return top


@user_errors
def main(argv=None):
    args = parser().parse_args(argv)
    check_at_least(args.batch, "--batch")
    model = expect_artifact(args.model, AUTOENCODER, "--model")
    vae = load_autoencoder(model, tile=args.tile)
    commands = {"encode": cmd_encode, "decode": cmd_decode, "reconstruct": cmd_reconstruct, "evaluate": cmd_evaluate}
    commands[args.command](args, vae, model)  # returns nothing: the dispatcher exits with main's value


if __name__ == "__main__":
    main()
