"""Frozen traced UNet, decoder and encoder (diffusion/traced.py): the same numbers as the eager modules, or not used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_helpers import make_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_pipeline(tmp_path_factory.mktemp("traced") / "pipeline")


def load(folder):
    from diffusion.pipeline import MitosisPipeline

    return MitosisPipeline.from_pretrained(folder)


@torch.no_grad()
def test_traced_graphs_match_eager_at_other_batches_and_timesteps(folder):
    from diffusion.traced import EAGER_FROM, TracedUNet, TracedVAE, trace_pipeline

    eager, pipe = load(folder), load(folder)
    assert trace_pipeline(pipe) is None
    assert isinstance(pipe.unet, TracedUNet) and isinstance(pipe.vae, TracedVAE)
    assert pipe.unet.config.sample_size == eager.unet.config.sample_size  # attributes reach the eager module
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 5, 12, EAGER_FROM):
        x = torch.randn((batch, 4, 16, 16), generator=gen)
        emb = eager.label_embedder(torch.rand(batch, generator=gen))
        for t in (0, 333, 999):
            steps = torch.full((batch,), t, dtype=torch.long)
            assert torch.equal(pipe.unet(x, steps, class_labels=emb).sample,
                               eager.unet(x, steps, class_labels=emb).sample), (batch, t)
        assert torch.equal(pipe.vae.decode(x).sample, eager.vae.decode(x).sample), batch
        np.testing.assert_array_equal(pipe.decode(x), eager.decode(x))  # channels-last, as decode_latents hands it
        images = torch.rand((batch, 3, 64, 64), generator=gen) * 2 - 1
        posterior, want = pipe.vae.encode(images).latent_dist, eager.vae.encode(images).latent_dist
        assert torch.equal(posterior.mean, want.mean) and torch.equal(posterior.std, want.std), batch
        uint8 = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert torch.equal(pipe.encode(uint8), eager.encode(uint8)), batch
    # batches from EAGER_FROM on (diffusers branches there) run the eager module
    assert pipe.unet.eager_calls == 3 and pipe.unet.traced_calls == 9
    assert pipe.vae.eager_calls == 4 and pipe.vae.traced_calls == 12  # decode and encode
    assert trace_pipeline(pipe) is None and isinstance(pipe.unet.eager, type(eager.unet))  # not traced twice


def test_traced_render_gives_the_same_frames(folder):
    from diffusion.real2gen import render
    from diffusion.traced import trace_pipeline

    eager, pipe = load(folder), load(folder)
    assert trace_pipeline(pipe) is None
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    kwargs = dict(images=images, own_labels=np.array([np.nan, 0.5], np.float32), conditions=[0.0, 0.5, 1.0],
                  mode="invert", guidance=2.0, steps=3, strength=0.7, reconstruct=False, inversion_iters=1)
    np.testing.assert_array_equal(render(pipe, **kwargs)["frames"], render(eager, **kwargs)["frames"])
    assert pipe.unet.traced_calls > 0 and pipe.vae.traced_calls > 0


@torch.no_grad()
def test_later_calls_run_the_checked_plan_even_where_the_fuser_is_on(folder):
    """TorchScript's fuser (on for CUDA tensors by default; switched on here for CPU ones) rewrites a graph after
    its first, profiled call. The graphs must keep running the plan the check compared with the eager module."""
    from diffusion.traced import trace_pipeline

    eager, pipe = load(folder), load(folder)
    was = torch._C._jit_can_fuse_on_cpu()
    torch._C._jit_override_can_fuse_on_cpu(True)
    try:
        assert trace_pipeline(pipe) is None
        gen = torch.Generator().manual_seed(2)
        x = torch.randn((3, 4, 16, 16), generator=gen)
        emb = eager.label_embedder(torch.rand(3, generator=gen))
        steps = torch.tensor([0, 7, 999])
        want_unet, want_decoded = eager.unet(x, steps, class_labels=emb).sample, eager.vae.decode(x).sample
        for call in range(4):  # the first call is profiled, the later ones would run the fused plan
            assert torch.equal(pipe.unet(x, steps, class_labels=emb).sample, want_unet), call
            assert torch.equal(pipe.vae.decode(x).sample, want_decoded), call
        assert pipe.unet.traced_calls == 4 and pipe.vae.traced_calls == 4
    finally:
        torch._C._jit_override_can_fuse_on_cpu(was)


def test_a_trace_that_differs_or_fails_is_not_used(folder, monkeypatch):
    import diffusion.traced as traced

    real = traced._frozen

    def off_by_a_little(module, example):
        graph = real(module, example)
        return lambda *args: graph(*args) + 1e-4

    pipe = load(folder)
    eager_unet, eager_vae = pipe.unet, pipe.vae
    monkeypatch.setattr(traced, "_frozen", off_by_a_little)
    assert traced.trace_pipeline(pipe) == "the traced graph's output differs from the eager module's"
    assert pipe.unet is eager_unet and pipe.vae is eager_vae

    def broken(module, example):
        raise RuntimeError("unsupported op\nsecond line")

    monkeypatch.setattr(traced, "_frozen", broken)
    assert traced.trace_pipeline(pipe) == "tracing failed (RuntimeError: unsupported op)"
    assert pipe.unet is eager_unet and pipe.vae is eager_vae


def test_serve_traces_unless_told_eager(tmp_path_factory):
    from diffusers import UNet2DModel

    from serve.cli import build, parser
    from serve_helpers import shared_world

    world = shared_world(tmp_path_factory)
    base = ["--pipeline", str(world["pipeline"]), "--classifier", str(world["classifier"]),
            "--slides", str(world["slide"]), "--exports", str(tmp_path_factory.mktemp("exports"))]
    traced = build(parser().parse_args(base)).state.explorer
    eager = build(parser().parse_args([*base, "--eager"])).state.explorer
    assert traced.eager_reason is None and not isinstance(traced.pipeline.unet, UNet2DModel)
    assert eager.eager_reason == "not asked" and isinstance(eager.pipeline.unet, UNet2DModel)
