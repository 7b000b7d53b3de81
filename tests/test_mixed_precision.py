"""`train.mixed_precision: bf16` on a machine without a GPU (CPU autocast): the stage trains, says so in run.json,
and still exports float32 weights that load and sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import run_module
from test_diffusion import make_dataset, make_vae, tiny_train_args


@pytest.mark.slow
def test_a_bf16_diffusion_run_on_the_cpu_exports_float32_weights_that_sample(tmp_path):
    import torch

    from diffusion.cache import main as cache_main
    from diffusion.pipeline import MitosisPipeline

    synth = make_dataset(tmp_path / "synth", n=24, seed=0)
    cache_main(["--vae", str(make_vae(tmp_path / "vae")), "--dataset", str(synth), "--out", str(tmp_path / "latents")])
    run = tmp_path / "run"
    # its own process: accelerate keeps one mixed-precision setting a process
    done = run_module("diffusion.train", *tiny_train_args(run, tmp_path / "latents", steps=2),
                      "--set", "train.mixed_precision=bf16", "--set", "preview.every=0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["mixed_precision"] == "bf16"
    weights = load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in weights.values())
    frames = MitosisPipeline.from_pretrained(run / "model").transitions([0], [0.0, 1.0], steps=2)
    assert frames.dtype == np.uint8 and frames.shape[:2] == (1, 2) and frames.std() > 0
