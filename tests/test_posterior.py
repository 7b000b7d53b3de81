"""The generative label posterior: shared noise, a model with a known answer, determinism,
two processes, and each documented bad input (the report section: test_posterior_report.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, accelerate_cmd, launch_output, read_csv, run_module

GRID = "0:1:5"


def tiny_pipeline(out: Path, prediction_type: str = "v_prediction") -> Path:
    """A random, very small pipeline folder (no training): 64x64 patches -> 4x16x16 latents."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

    from diffusion.model import LabelEmbedder, time_embed_dim
    from diffusion.pipeline import MitosisPipeline
    from test_diffusion import make_vae

    make_vae(out.parent / "vae")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=4, out_channels=4, class_embed_type="identity",
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    embedder = LabelEmbedder(time_embed_dim(unet), fourier_features=4, hidden=16)
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                              prediction_type=prediction_type, clip_sample=False)
    pipe = MitosisPipeline(AutoencoderKL.from_pretrained(out.parent / "vae"), unet, embedder, scheduler,
                           {"image_size": 64, "latent_shape": [4, 16, 16], "prediction_type": prediction_type})
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from test_diffusion import make_dataset

    root = tmp_path_factory.mktemp("posterior")
    return {"root": root, "pipeline": tiny_pipeline(root / "pipe" / "model"),
            "data": make_dataset(root / "data", n=40, seed=0)}


def posterior_args(world, out, *extra) -> list[str]:
    return ["--pipeline", str(world["pipeline"]), str(world["data"]), "--split", "test", "--grid", GRID,
            "--draws", "3", "--threads", "1", "--out", str(out), "--quiet", *map(str, extra)]


# -- the measurement --------------------------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """Wraps a UNet and keeps every call's inputs."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x, t, class_labels):
        self.calls.append((x.clone(), torch.as_tensor(t).clone(), class_labels.clone()))
        return self.unet(x, t, class_labels=class_labels)


def test_every_model_input_is_on_the_pipelines_device():
    # on a GPU, the CPU noise, labels and timesteps once met the pipeline's CUDA weights. The meta device stands in
    # for the GPU: every UNet and embedder input must be there, so the first thing to fail is copying the errors out.
    from diffusers import DDPMScheduler

    from diffusion.posterior import denoising_errors

    seen = set()

    def unet(x, t, class_labels):
        seen.update((x.device.type, t.device.type, class_labels.device.type))
        return SimpleNamespace(sample=torch.zeros_like(x))

    def label_embedder(labels):
        seen.add(labels.device.type)
        return torch.zeros(len(labels), 8, device=labels.device)

    pipe = SimpleNamespace(scheduler=DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction"),
                           device=torch.device("meta"), unet=unet, label_embedder=label_embedder)
    for shared in (True, False):
        with pytest.raises(NotImplementedError, match="meta"):
            denoising_errors(pipe, torch.zeros(2, 4, 8, 8), ["a", "b"], [0.0, 1.0], draws=2, seed=0,
                             space="v_prediction", shared_noise=shared)
        assert seen == {"meta"}


def test_one_call_per_draw_with_the_same_noisy_latent_for_every_label(world):
    from diffusion.pipeline import MitosisPipeline
    from diffusion.posterior import denoising_errors

    pipe = MitosisPipeline.from_pretrained(world["pipeline"])
    pipe.unet = Recorder(pipe.unet)
    latents = torch.randn(3, 4, 16, 16)
    grid = [0.0, 0.5, 1.0]
    errors = denoising_errors(pipe, latents, ["a", "b", "c"], grid, draws=4, seed=0, space="v_prediction")
    assert errors.shape == (3, 4, 4) and np.isfinite(errors).all()
    calls = pipe.unet.calls
    assert len(calls) == 4  # one UNet call per (t, eps): every label and patch of that draw in one batch
    for x, t, emb in calls:
        assert x.shape == (3 * 4, 4, 16, 16)
        per_patch = x.reshape(3, 4, 4, 16, 16)
        for p in range(3):  # shared eps: every grid label and the null label see the very same noisy latent
            assert torch.equal(per_patch[p], per_patch[p, :1].expand_as(per_patch[p]))
        assert not torch.equal(per_patch[0, 0], per_patch[1, 0])  # but each patch its own noise
        assert len(torch.unique(t)) == 1
        assert torch.equal(emb[:4], pipe.label_embedder(torch.tensor([0.0, 0.5, 1.0, float("nan")])))
    assert sorted(int(c[1][0]) for c in calls) == [12, 37, 62, 87]  # evenly spaced over 100 timesteps
    alphas = pipe.scheduler.alphas_cumprod
    eps = [(x[0] - alphas[t[0]].sqrt() * latents[0]) / (1 - alphas[t[0]]).sqrt() for x, t, _ in calls]
    assert not torch.allclose(eps[0], eps[1], atol=1e-3)  # each draw (t_j, eps_j) its own noise
    # the naive variant draws fresh noise per label
    pipe.unet.calls.clear()
    denoising_errors(pipe, latents, ["a", "b", "c"], grid, draws=1, seed=0, space="v_prediction", shared_noise=False)
    assert len(pipe.unet.calls) == 4 and not torch.equal(pipe.unet.calls[0][0], pipe.unet.calls[1][0])


def test_noise_is_keyed_by_patch_not_by_batch(world):
    from diffusion.pipeline import MitosisPipeline
    from diffusion.posterior import denoising_errors

    pipe = MitosisPipeline.from_pretrained(world["pipeline"])
    latents = torch.randn(4, 4, 16, 16)
    ids = ["w", "x", "y", "z"]
    together = denoising_errors(pipe, latents, ids, [0.0, 1.0], 2, 7, "v_prediction", patches_per_call=4)
    alone = denoising_errors(pipe, latents[2:3], ids[2:3], [0.0, 1.0], 2, 7, "v_prediction")
    np.testing.assert_allclose(alone[0], together[2], rtol=1e-4)
    other_seed = denoising_errors(pipe, latents[2:3], ids[2:3], [0.0, 1.0], 2, 8, "v_prediction")
    assert not np.allclose(other_seed, alone)


class KnownAnswer(torch.nn.Module):
    """A 'sample'-prediction model that predicts the clean latent as a flat field of value y."""

    def forward(self, x, t, class_labels):
        y = class_labels[:, 0]  # the embedder below passes y through; null -> 0.5
        return SimpleNamespace(sample=y[:, None, None, None].expand_as(x).clone())


@pytest.mark.parametrize("space", ["sample", "epsilon", "v_prediction"])
def test_a_model_with_a_known_best_label_is_recovered(space):
    from diffusers import DDPMScheduler

    from diffusion.posterior import denoising_errors
    from diffusion.posterior_fit import Calibration, log_posterior, summaries

    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="sample", clip_sample=False)
    pipe = SimpleNamespace(unet=KnownAnswer(), scheduler=scheduler, device=torch.device("cpu"),
                           label_embedder=lambda y: torch.nan_to_num(y, nan=0.5)[:, None].repeat(1, 4))
    truth = [0.1, 0.7, 0.4]
    latents = torch.stack([torch.full((4, 8, 8), v) for v in truth])  # the clean latent IS the answer
    grid = np.linspace(0, 1, 11).tolist()
    errors = denoising_errors(pipe, latents, ["a", "b", "c"], grid, draws=5, seed=0, space=space)
    assert errors[:, :, :-1].mean(1).argmin(1).tolist() == [1, 7, 4]
    prob = np.exp(log_posterior(errors, np.arange(5) * 20, 100, Calibration(temperature=0.01)))
    summary = summaries(prob, grid)
    np.testing.assert_allclose(summary["map_y"], truth)
    np.testing.assert_allclose(prob.sum(1), 1.0)


def test_in_space_converts_between_the_three_parametrisations():
    from diffusion.posterior import in_space

    gen = torch.Generator().manual_seed(0)
    clean, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for alpha in (torch.tensor(0.9), torch.tensor(0.2)):
        a, s = alpha.sqrt(), (1 - alpha).sqrt()
        noisy = a * clean + s * eps  # what scheduler.add_noise computes
        truth = {"epsilon": eps, "sample": clean, "v_prediction": a * eps - s * clean}
        for kind, pred in truth.items():
            for space, want in truth.items():
                torch.testing.assert_close(in_space(pred, noisy, alpha, kind, space), want, atol=1e-5, rtol=1e-4)


def test_guidance_scales_the_conditional_prediction_away_from_the_null_one():
    from diffusers import DDPMScheduler

    from diffusion.posterior import denoising_errors

    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="sample", clip_sample=False)
    pipe = SimpleNamespace(unet=KnownAnswer(), scheduler=scheduler, device=torch.device("cpu"),
                           label_embedder=lambda y: torch.nan_to_num(y, nan=0.5)[:, None].repeat(1, 4))
    latents = torch.full((1, 4, 8, 8), 0.8)
    grid = [0.0, 0.5, 1.0]

    def errors(guidance):
        return denoising_errors(pipe, latents, ["a"], grid, draws=2, seed=0, space="sample", guidance=guidance)

    # guidance 0: every label predicts what the null label predicts (0.5); 2: 0.5 + 2 (y - 0.5) = 2y - 0.5
    np.testing.assert_allclose(errors(0.0)[0], np.full((2, 4), 0.3 ** 2), rtol=1e-5)
    np.testing.assert_allclose(errors(2.0)[0], np.tile([1.3 ** 2, 0.3 ** 2, 0.7 ** 2, 0.3 ** 2], (2, 1)), rtol=1e-5)


# -- the command ------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("error::RuntimeWarning")  # its calibration has a start that runs away
def test_command_writes_csv_json_and_is_deterministic(world):
    from diffusion.posterior import main

    root = world["root"]
    main(posterior_args(world, root / "one", "--calibrate", world["data"], "--calibrate-split", "train"))
    main(posterior_args(world, root / "two", "--calibrate", world["data"], "--calibrate-split", "train"))
    rows = read_csv(root / "one" / "posterior.csv")
    assert list(rows[0]) == ["id", "p_y=0", "p_y=0.25", "p_y=0.5", "p_y=0.75", "p_y=1", "expected_y", "map_y",
                             "posterior_std", "uncond_error", "name", "label"]
    assert len(rows) == 8 and rows[0]["id"].startswith("p0-")  # the dataset's test split, ids without the folder
    for row in rows:
        p = np.array([float(row[f"p_y={g}"]) for g in ("0", "0.25", "0.5", "0.75", "1")])
        assert p.sum() == pytest.approx(1.0, abs=1e-4)
        assert float(row["expected_y"]) == pytest.approx(p @ np.linspace(0, 1, 5), abs=1e-4)
        assert float(row["map_y"]) == [0, 0.25, 0.5, 0.75, 1][int(p.argmax())]
        assert float(row["uncond_error"]) > 0
    uncond = np.load(root / "one" / "errors.npy")[:, :, -1].mean(1)  # the null label is the last column
    np.testing.assert_allclose([float(row["uncond_error"]) for row in rows], uncond, rtol=1e-5)
    assert (root / "one" / "posterior.csv").read_bytes() == (root / "two" / "posterior.csv").read_bytes()
    info = json.loads((root / "one" / "posterior.json").read_text())
    assert info["grid"] == [0, 0.25, 0.5, 0.75, 1] and info["draws"] == 3 and info["seed"] == 0
    assert info["calibration"]["calibrated"] and info["temperature"] > 0 and len(info["pipeline_hash"]) == 64
    assert info["settings"]["error_space"] == "epsilon"  # the default, whatever the model predicts
    assert info["calibration"]["t_bands"] == 3 and len(info["calibration"]["t_weights"]) == 3
    assert np.load(root / "one" / "errors.npy").shape == (8, 3, 6)
    calibration_errors = np.load(root / "one" / "calibration_errors.npy")  # to refit without the UNet
    assert calibration_errors.shape[1:] == (3, 6) and len(calibration_errors) == info["calibration"]["fit"]["patches"]
    # a later run reuses the fitted temperature
    main(posterior_args(world, root / "three", "--temperature-from", root / "one"))
    assert json.loads((root / "three" / "posterior.json").read_text())["temperature"] == info["temperature"]
    assert read_csv(root / "three" / "posterior.csv") == rows
    # another seed, other noise
    main(posterior_args(world, root / "four", "--temperature-from", root / "one", "--seed", "1"))
    assert not np.allclose(np.load(root / "four" / "errors.npy"), np.load(root / "one" / "errors.npy"))


@pytest.mark.slow
def test_two_processes_give_the_one_process_output(world, tmp_path):
    args = ["--pipeline", str(world["pipeline"]), str(world["data"]), "--split", "train", "--limit", "6",
            "--grid", GRID, "--draws", "2", "--temperature", "0.01", "--patches-per-call", "2", "--quiet"]
    result = subprocess.run(accelerate_cmd("diffusion.posterior", *args, "--out", tmp_path / "two", processes=2),
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, launch_output(result.stderr)
    from diffusion.posterior import main

    main([*args, "--threads", "1", "--out", str(tmp_path / "one")])
    one, two = read_csv(tmp_path / "one" / "posterior.csv"), read_csv(tmp_path / "two" / "posterior.csv")
    assert len(one) == len(two) == 6 and [r["id"] for r in one] == [r["id"] for r in two]
    np.testing.assert_allclose(np.load(tmp_path / "two" / "errors.npy"), np.load(tmp_path / "one" / "errors.npy"),
                               rtol=1e-4, atol=1e-6)  # thread counts may move the last bits
    for a, b in zip(one, two):
        assert float(a["expected_y"]) == pytest.approx(float(b["expected_y"]), abs=1e-3)


# -- bad input: one clear line each -----------------------------------------------------------------------

def one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_grid_outside_zero_one(world, tmp_path):
    result = run_module("diffusion.posterior", *posterior_args(world, tmp_path / "o"), "--grid", "0:1.5:4")
    one_line_error(result, "--grid", "1.5", "outside [0, 1]")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("grid, message", [("0", "needs at least 2 labels, none repeated"),
                                           ("0:1:1", "needs at least 2 labels, none repeated"),
                                           ("0.5,0.5", "0.5 appears more than once"),
                                           ("0,0.5,0.5,1", "0.5 appears more than once")])
def test_a_grid_of_one_label_or_a_repeated_one(world, tmp_path, grid, message):
    result = run_module("diffusion.posterior", *posterior_args(world, tmp_path / "o"), "--grid", grid)
    one_line_error(result, "--grid", message, grid)
    assert not (tmp_path / "o").exists()


def test_draws_below_one(world, tmp_path):
    result = run_module("diffusion.posterior", *posterior_args(world, tmp_path / "o"), "--draws", "0")
    one_line_error(result, "--draws", "must be >= 1")


def test_a_negative_seed(world, tmp_path):
    # was accepted (torch takes negative seeds), unlike every other command's --seed
    result = run_module("diffusion.posterior", *posterior_args(world, tmp_path / "o"), "--seed", "-1")
    one_line_error(result, "--seed", "must be >= 0, got -1")
    assert not (tmp_path / "o").exists()


def test_classifier_folder_as_pipeline(world, tmp_path):
    folder = tmp_path / "classifier"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"format": "mitosis-ldm/classifier"}))
    result = run_module("diffusion.posterior", "--pipeline", folder, world["data"], "--out", tmp_path / "o")
    one_line_error(result, str(folder), "is a classifier folder", "--pipeline expects a diffusion pipeline folder")


def test_images_of_the_wrong_size_for_the_vae(world, tmp_path):
    from mitosis_ldm.images import save_png

    save_png(tmp_path / "small.png", np.zeros((32, 32, 3), np.uint8))
    result = run_module("diffusion.posterior", "--pipeline", world["pipeline"], tmp_path / "small.png",
                        "--out", tmp_path / "o")
    one_line_error(result, "small.png", "32x32", "VAE takes 64x64")
    assert not (tmp_path / "o").exists()


def run_main(capsys, *args) -> str:
    """`mitosis-ldm posterior args` in-process; the one error line it prints."""
    from diffusion.posterior import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("extra, words", [
    (["x.png", "--temperature", "0"], "--temperature: must be > 0, got 0"),
    (["x.png", "--guidance", "-1"], "--guidance: must be >= 0, got -1"),
    (["x.png", "--calibrate", "ds", "--temperature", "0.1"],
     "--temperature: give only one of --calibrate, --temperature-from and --temperature"),
    (["x.png", "--temperature-from", "post", "--calibrate", "ds"],
     "--temperature-from: give only one of --calibrate, --temperature-from and --temperature"),
    ([], "INPUT: give patches to judge, or --calibrate DATASET"),
])
def test_contradicting_flags_are_one_line_before_any_work(tmp_path, capsys, extra, words):
    line = run_main(capsys, "--pipeline", tmp_path / "no-pipeline", *extra, "--out", tmp_path / "o")
    assert line == f"error: {words}"


def test_an_existing_output_is_refused_before_the_pipeline_loads_and_threads_are_restored(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        (tmp_path / "o").mkdir()
        line = run_main(capsys, "--pipeline", tmp_path / "no-pipeline", "x.png", "--out", tmp_path / "o")
        assert line == f"error: {tmp_path / 'o'}: already exists; pass --overwrite to replace it"
        run_main(capsys, "--pipeline", tmp_path / "no-pipeline", "x.png", "--threads", "1", "--out", tmp_path / "o",
                 "--overwrite")  # fails loading the pipeline, with one thread
        assert torch.get_num_threads() == 2  # as it was: tests and notebooks call main() in-process
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("field, value, words", [
    ("grid", [0, 1], "field 'settings.grid' is [0, 1] but this run uses [0, 0.5, 1]"),
    ("error_space", "sample", "field 'settings.error_space' is 'sample' but this run uses 'epsilon'"),
    ("guidance", 2.0, "field 'settings.guidance' is 2.0 but this run uses 1.0"),
    ("pipeline_hash", "another", "field 'pipeline_hash' names another pipeline"),
])
def test_a_temperature_from_other_settings_or_another_pipeline_is_refused(tmp_path, field, value, words):
    from diffusion.posterior import calibration_from
    from mitosis_ldm.errors import UserError

    settings = {"grid": [0, 0.5, 1], "error_space": "epsilon", "guidance": 1.0}
    info = {"settings": dict(settings), "pipeline_hash": "this", "calibration": {"temperature": 0.02}}
    assert calibration_from(write_info(tmp_path / "ok", info), settings, "this").temperature == 0.02
    if field == "pipeline_hash":
        info[field] = value
    else:
        info["settings"][field] = value
    with pytest.raises(UserError) as err:
        calibration_from(write_info(tmp_path / "bad", info), settings, "this")
    assert str(err.value).startswith(f"{tmp_path / 'bad' / 'posterior.json'}: {words}")


def write_info(folder: Path, info: dict) -> Path:
    folder.mkdir()
    (folder / "posterior.json").write_text(json.dumps(info))
    return folder


def test_csv_cells_are_six_significant_digits_and_empty_when_not_finite():
    from diffusion.posterior import csv_text

    assert csv_text(["id", "label", "p"], [["a", float("nan"), np.float32(1 / 3)], ["b", 0.5, float("inf")]]) == \
        "id,label,p\na,,0.333333\nb,0.5,\n"


def test_the_calibration_set_gives_mitotic_votes_out_of_experts(world):
    from diffusion.posterior import calibration_set
    from patches.dataset import PatchDataset

    ids, images, mitotic, experts = calibration_set(str(world["data"]), "train", 5, (64, 64, 3))
    assert len(ids) == len(images) == len(mitotic) == len(experts) == 5 and (experts > 0).all()
    assert (mitotic <= experts).all()
    ds = PatchDataset(world["data"], split="train", labelled_only=True)
    soft = dict(zip(ds.ids(), ds.soft_labels))
    assert len(ds) > 5 and (ids[0], ids[-1]) == (ds.ids()[0], ds.ids()[-1])  # --calibrate-limit: spread evenly
    np.testing.assert_allclose(mitotic / experts, [soft[i] for i in ids])


def test_a_patch_id_given_twice_is_refused(world, tmp_path):
    import shutil

    from diffusion.posterior import gather_patches
    from mitosis_ldm.errors import UserError

    copy = shutil.copytree(world["data"], tmp_path / "copy")  # other names, the same ids: one noise, one CSV row id
    for twice in ([world["data"], world["data"]], [world["data"], copy]):
        with pytest.raises(UserError, match="INPUT: patch id 'p0-.*' appears twice; give each patch once"):
            gather_patches([str(p) for p in twice], (64, 64, 3), "test", None)
