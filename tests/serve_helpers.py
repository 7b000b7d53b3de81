"""Tiny stand-ins for the explorer tests: a drawn slide with known nuclei, a random tiny pipeline, classifiers.

The slide is pink tissue with purple discs (nuclei, radius 8 px as at 20x) at known
centres. `fake_render` darkens the nucleus with the condition and `DarknessEnsemble`
scores central darkness, so "the score rises from y = 0 to y = 1" is a property a
broken page or server would lose, with no trained model needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from report_helpers import FakeEnsemble
from test_diffusion import make_dataset, make_vae

NUCLEI = [(120, 100), (300, 140), (460, 90), (200, 300), (420, 320), (90, 350)]
SLIDE_SIZE = (560, 420)  # (width, height)


def draw_slide(path: Path, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = SLIDE_SIZE
    yy, xx = np.mgrid[:height, :width]
    image = np.empty((height, width, 3), np.float32)
    image[:] = (232, 186, 212)
    for i, (x, y) in enumerate(NUCLEI):
        radius = 8 + (i % 3)
        disc = (xx - x) ** 2 + (yy - y) ** 2 < radius ** 2
        image[disc] = (150, 100, 170)
    image += rng.normal(0, 4, image.shape)
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path)
    return path


def fake_render(pipe, *, images, own_labels, conditions, mode, guidance, steps, strength, **_):
    """A stand-in for diffusion.real2gen.render: the nucleus (dark pixels) darkens with the condition."""
    frames = []
    for image in images:
        nucleus = image.astype(np.float32).mean(-1) < 190
        row = []
        for c in conditions:
            frame = image.astype(np.float32)
            frame[nucleus] *= 1 - 0.6 * float(c)
            row.append(frame.clip(0, 255).astype(np.uint8))
        frames.append(np.stack(row))
    return {"frames": np.stack(frames)}


class DarknessEnsemble(FakeEnsemble):
    """FakeEnsemble (score = central darkness, three offset 'members') at the pipeline's 64 px."""

    def __init__(self):
        super().__init__(patch_size=64)


def make_pipeline(out: Path) -> Path:
    """A random (untrained) tiny pipeline folder: real code paths, meaningless pictures, fast."""
    from diffusers import AutoencoderKL, DDPMScheduler

    from diffusion.model import LabelEmbedder, build_unet, time_embed_dim
    from diffusion.pipeline import MitosisPipeline
    from mitosis_ldm.io import atomic_dir

    vae = AutoencoderKL.from_pretrained(make_vae(out.parent / f"{out.name}-vae"))
    torch.manual_seed(0)
    unet = build_unet("tiny", 4, 16)
    embedder = LabelEmbedder(time_embed_dim(unet), 4, 16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", clip_sample=False)
    info = {"image_size": 64, "latent_shape": [4, 16, 16], "prediction_type": "v_prediction",
            "default_guidance": 2.0, "default_steps": 4, "default_sampler": "ddim",
            "default_real2gen_guidance": 2.0, "default_real2gen_strength": 0.5}
    with atomic_dir(out) as tmp:
        MitosisPipeline(vae, unet, embedder, scheduler, info).save_pretrained(tmp)
    return out


def make_classifier(out: Path) -> Path:
    from test_classifier import tiny_ensemble

    tiny_ensemble().save_pretrained(out)
    return out


_WORLDS: dict = {}


def shared_world(tmp_path_factory) -> dict:
    """One world per test session (the explorer never writes into it), shared by the serve test files."""
    if "world" not in _WORLDS:
        _WORLDS["world"] = make_world(tmp_path_factory.mktemp("serve-world"))
    return _WORLDS["world"]


def make_world(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    return {"slide": draw_slide(root / "slide.png"), "pipeline": make_pipeline(root / "pipeline"),
            "classifier": make_classifier(root / "classifier"),
            "dataset": make_dataset(root / "patches", n=24, size=64, seed=3), "root": root}


def make_explorer(world: dict, exports: Path, fake: bool = False, queue: int = 16, max_body: int = 16_384):
    """The app over the world's slide + dataset; `fake` swaps in fake_render + DarknessEnsemble."""
    from classifier.model import ClassifierEnsemble
    from diffusion.pipeline import MitosisPipeline
    from patches.dataset import PatchDataset
    from serve.app import create_app
    from serve.explorer import Explorer
    from serve.tiles import SlideRegistry
    from serve.worker import ModelWorker

    pipeline = MitosisPipeline.from_pretrained(world["pipeline"])
    classifier = DarknessEnsemble() if fake else ClassifierEnsemble.from_pretrained(world["classifier"])
    explorer = Explorer(SlideRegistry([str(world["slide"])]),
                        {"patches": (world["dataset"], PatchDataset(world["dataset"]))}, pipeline, classifier,
                        exports, pipeline_path=str(world["pipeline"]), classifier_path=str(world["classifier"]),
                        render_fn=fake_render if fake else None)
    return create_app(explorer, ModelWorker(queue), max_body=max_body)
