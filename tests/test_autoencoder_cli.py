"""`mitosis-ldm vae` / `python -m autoencoder`: round trips, slide regions, metrics and each bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from autoencoder.cli import main
from autoencoder.model import build_autoencoder
from mitosis_ldm.errors import UserError
from mitosis_ldm.images import read_image

from conftest import run_module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random-weight autoencoder folder (what training exports, minus the training)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "model"
    vae = build_autoencoder("tiny")
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of five RGB PNGs: four 32x32 and one 48x40 (mixed sizes are allowed)."""
    folder = tmp_path_factory.mktemp("imgs") / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / "wide.png")
    return folder


def test_encode_then_decode_equals_reconstruct(tmp_path, model_dir, images):
    z = tmp_path / "z.safetensors"
    main(["encode", "--model", str(model_dir), str(images), "--out", str(z)])
    meta = json.loads(z.with_suffix(".json").read_text())
    assert meta["count"] == 5 and meta["scaling_factor"] == 0.5 and meta["shapes"][-1] == [4, 12, 10]
    main(["decode", "--model", str(model_dir), str(z), "--out", str(tmp_path / "dec")])
    main(["reconstruct", "--model", str(model_dir), str(images), "--out", str(tmp_path / "rec")])
    decoded = sorted((tmp_path / "dec").glob("*.png"))
    assert [p.name for p in decoded] == ["00000-p0.png", "00001-p1.png", "00002-p2.png", "00003-p3.png",
                                         "00004-wide.png"]
    for path in decoded:
        pair = read_image(tmp_path / "rec" / path.name)
        w = pair.shape[1] // 2
        original = read_image(images / (path.name.split("-", 1)[1]))
        assert np.array_equal(pair[:, :w], original)
        assert np.array_equal(pair[:, w:], read_image(path))
    assert (tmp_path / "rec" / "sheet.png").exists()


def test_pixels_survive_the_trip_to_model_range_and_back_and_out_of_range_outputs_clip():
    from autoencoder.cli import to_tensor, to_uint8

    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    x = to_tensor(levels)
    assert x.min() == -1 and x.max() == 1
    assert np.array_equal(to_uint8(x), levels)  # every 8-bit level back unchanged
    over = torch.tensor([-3.0, -1.01, 1.01, 3.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert to_uint8(over)[0, 0, :, 0].tolist() == [0, 0, 255, 255]  # a decoder overshoot saturates, never wraps


def test_dataset_and_large_tiled_slide_region(tmp_path, model_dir, sample_slide):
    out = tmp_path / "region.safetensors"
    # 400x300 is larger than the 128-pixel tile: encoded in blended tiles, still exactly /4
    main(["encode", "--model", str(model_dir), "--slide", str(sample_slide), "--region", "200,300,400,300",
          "--tile", "128", "--out", str(out)])
    from safetensors.torch import load_file

    assert load_file(out)["latents"].shape == (1, 4, 75, 100)
    main(["decode", "--model", str(model_dir), str(out), "--out", str(tmp_path / "dec")])
    (png,) = (tmp_path / "dec").glob("*.png")
    assert read_image(png).shape == (300, 400, 3)


def test_a_slide_region_is_read_at_x_y_and_may_touch_the_slides_edge(sample_slide):
    import openslide

    from autoencoder.cli import read_slide_region

    slide = openslide.OpenSlide(str(sample_slide))
    width, height = slide.dimensions
    name, image = read_slide_region(str(sample_slide), "100,700,40,32")
    expected = np.asarray(slide.read_region((100, 700), 0, (40, 32)).convert("RGB"))
    assert name.endswith("@100,700,40,32") and np.array_equal(image, expected)
    _, corner = read_slide_region(str(sample_slide), f"{width - 8},{height - 12},8,12")  # the last pixels
    assert corner.shape == (12, 8, 3)
    for region in (f"{width - 7},0,8,8", f"0,{height - 7},8,8"):
        with pytest.raises(UserError, match="runs outside"):
            read_slide_region(str(sample_slide), region)


def test_latents_of_many_shapes_decode_in_their_own_order(tmp_path, model_dir):
    from safetensors.torch import save_file

    # eleven shapes: stored one tensor each, latents.0 ... latents.10; latent i is 4 * (i + 1) pixels wide
    save_file({f"latents.{i}": torch.zeros(1, 4, 2, i + 1) for i in range(11)}, tmp_path / "z.safetensors")
    main(["decode", "--model", str(model_dir), str(tmp_path / "z.safetensors"), "--out", str(tmp_path / "dec")])
    for i in range(11):
        assert read_image(tmp_path / "dec" / f"{i:05d}-{i}.png").shape == (8, 4 * (i + 1), 3)


def test_evaluate_writes_per_image_and_aggregate_metrics(tmp_path, model_dir, images):
    main(["evaluate", "--model", str(model_dir), str(images / "p0.png"), str(images / "p1.png"),
          "--out", str(tmp_path / "ev")])
    summary = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "ev" / "metrics.csv")))
    assert [r["name"].endswith(f"p{i}.png") for i, r in enumerate(rows)] == [True, True]
    psnr = [float(r["psnr"]) for r in rows]
    assert summary["psnr_mean"] == pytest.approx(np.mean(psnr), abs=1e-3)
    ssim = [float(r["ssim"]) for r in rows]
    assert summary["ssim_mean"] == pytest.approx(np.mean(ssim), abs=1e-4) and all(-1 <= s <= 1 for s in ssim)
    assert summary["count"] == 2
    # an identity check of the metric: PSNR of the decoder output against itself is infinite, so we
    # compare against skimage on one image instead
    from skimage.metrics import peak_signal_noise_ratio

    main(["reconstruct", "--model", str(model_dir), str(images / "p0.png"), "--out", str(tmp_path / "rec")])
    pair = read_image(next((tmp_path / "rec").glob("00000-*.png")))
    assert peak_signal_noise_ratio(pair[:, :32], pair[:, 32:]) == pytest.approx(psnr[0], abs=1e-3)


def test_refuses_to_overwrite(tmp_path, model_dir, images):
    out = tmp_path / "z.safetensors"
    out.write_text("mine")
    result = run_module("autoencoder", "encode", "--model", model_dir, images, "--out", out)
    assert result.returncode == 2 and "--overwrite" in result.stderr and out.read_text() == "mine"


def test_refuses_to_overwrite_the_sidecar_of_a_new_latents_file(tmp_path, model_dir, images):
    sidecar = tmp_path / "z.json"
    sidecar.write_text("mine")
    result = run_module("autoencoder", "encode", "--model", model_dir, images, "--out", tmp_path / "z.safetensors")
    assert result.returncode == 2 and result.stderr.strip().endswith(f"{sidecar}: already exists; pass --overwrite "
                                                                     "to replace it")
    assert sidecar.read_text() == "mine" and not (tmp_path / "z.safetensors").exists()


def test_every_command_replaces_its_output_with_overwrite(tmp_path, model_dir, images):
    z = tmp_path / "z.safetensors"
    z.write_text("old")
    main(["encode", "--model", str(model_dir), str(images / "p0.png"), "--out", str(z), "--overwrite"])
    assert json.loads(z.with_suffix(".json").read_text())["count"] == 1
    for command, inputs, made in (("decode", [str(z)], "00000-p0.png"),  # named by the sidecar
                                  ("reconstruct", [str(images / "p1.png")], "00000-p1.png"),
                                  ("evaluate", [str(images / "p1.png")], "metrics.csv")):
        out = tmp_path / command
        out.mkdir()
        (out / "old.txt").write_text("old")
        main([command, "--model", str(model_dir), *inputs, "--out", str(out), "--overwrite"])
        assert not (out / "old.txt").exists() and (out / made).exists()


def _bad(tmp_path, model, *inputs, command="encode"):
    out = tmp_path / ("out.safetensors" if command == "encode" else "out")
    result = run_module("mitosis_ldm", "vae", command, "--model", model, *inputs, "--out", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary leftovers
    return lines[0]


def test_bad_wrong_channel_count(tmp_path, model_dir):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "grey.png")
    assert "3 channels, got 1" in _bad(tmp_path, model_dir, tmp_path / "grey.png")


def test_bad_latent_channel_count(tmp_path, model_dir):
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(1, 3, 8, 8)}, tmp_path / "z.safetensors")
    line = _bad(tmp_path, model_dir, tmp_path / "z.safetensors", command="decode")
    assert "3 channels" in line and "expects 4" in line


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_bad_latents_that_are_not_finite(tmp_path, model_dir, value):
    # were decoded to black PNGs without a word
    from safetensors.torch import save_file

    latents = torch.zeros(2, 4, 8, 8)
    latents[1, 2, 3, 4] = value
    save_file({"latents": latents}, tmp_path / "z.safetensors")
    line = _bad(tmp_path, model_dir, tmp_path / "z.safetensors", command="decode")
    assert line.endswith("z.safetensors: latent 1 holds NaN or inf values; it would decode to a blank image"), line


def test_bad_size_not_divisible_by_four(tmp_path, model_dir):
    Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(tmp_path / "odd.png")
    assert "not divisible by 4" in _bad(tmp_path, model_dir, tmp_path / "odd.png", command="reconstruct")


def test_bad_corrupt_file(tmp_path, model_dir):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert "broken.png: cannot read image" in _bad(tmp_path, model_dir, tmp_path / "broken.png", command="evaluate")


@pytest.mark.parametrize("kind, marker, text", [
    ("classifier", "config.json", "is a classifier folder, but --model expects an autoencoder folder"),
    ("pipeline", "pipeline.json", "is a diffusion pipeline folder, but --model expects an autoencoder folder"),
])
def test_bad_model_folder_of_another_stage(tmp_path, images, kind, marker, text):
    folder = tmp_path / kind
    folder.mkdir()
    (folder / marker).write_text(json.dumps({"format": f"mitosis-ldm/{kind}"}))
    assert text in _bad(tmp_path, folder, images)


def test_bad_empty_folder(tmp_path, model_dir):
    (tmp_path / "empty").mkdir()
    assert "empty: folder holds no images" in _bad(tmp_path, model_dir, tmp_path / "empty")


def test_bad_latents_output_not_safetensors(tmp_path, model_dir, images, capsys):
    # a .json --out would be overwritten by its own sidecar
    with pytest.raises(SystemExit):
        main(["encode", "--model", str(model_dir), str(images / "p0.png"), "--out", str(tmp_path / "z.json")])
    assert capsys.readouterr().err.strip().endswith("--out: must end in .safetensors, got '" f"{tmp_path / 'z.json'}'")
    assert list(tmp_path.iterdir()) == []


def test_bad_sidecar_naming_more_latents_than_the_file_holds(tmp_path, model_dir):
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(2, 4, 8, 8)}, tmp_path / "z.safetensors")
    (tmp_path / "z.json").write_text(json.dumps({"names": ["a", "b", "c"]}))
    line = _bad(tmp_path, model_dir, tmp_path / "z.safetensors", command="decode")
    assert line.endswith("z.json: field 'names' lists 3 names for 2 latents"), line


def test_bad_tile_not_divisible_by_four(tmp_path, model_dir, images):
    assert _bad(tmp_path, model_dir, images, "--tile", "130").endswith("--tile: must be divisible by 4, got 130")


@pytest.mark.parametrize("tensors, sidecar, message", [
    ({"latents.0": torch.zeros(1, 4, 8, 8), "latents.x": torch.zeros(1, 4, 4, 4)}, None,
     "z.safetensors: the keys of latents of several shapes must be latents.0 ... latents.1, got latents.0, latents.x"),
    ({"latents.0": torch.zeros(1, 4, 8, 8), "latents.2": torch.zeros(1, 4, 4, 4)}, None,
     "must be latents.0 ... latents.1, got latents.0, latents.2"),
    ({"latents": torch.zeros(0, 4, 8, 8)}, None, "z.safetensors: holds no latents"),
    ({"latents": torch.zeros(2, 4, 0, 5)}, None, "z.safetensors: latent 0 has no pixels (shape (1, 4, 0, 5))"),
    ({"latents": torch.zeros(2, 4, 8, 8)}, ["a", "b"], "z.json: field '(top)' is ['a', 'b'], expected an object"),
    ({"latents": torch.zeros(2, 4, 8, 8)}, {"names": "ab"}, "z.json: field 'names' is 'ab', expected a list"),
])
def test_bad_latents_file_or_sidecar_the_decoder_cannot_use(tmp_path, model_dir, tensors, sidecar, message):
    # each was a traceback: a key that is no number, an empty latent in a convolution, a sidecar that is no object
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "z.safetensors")
    if sidecar is not None:
        (tmp_path / "z.json").write_text(json.dumps(sidecar))
    line = _bad(tmp_path, model_dir, tmp_path / "z.safetensors", command="decode")
    assert line.endswith(message), line
