"""Frozen TorchScript graphs of a pipeline's UNet, decoder and encoder, for callers that wait on one render.

    from diffusion.traced import trace_pipeline
    trace_pipeline(pipe)   # pipe.unet, pipe.vae.encode and .decode now run frozen graphs; the rest is unchanged

At the explorer's sizes a diffusers UNet call is mostly Python dispatch: on the demo model (2 cores) one
batch-1 call on 16x16 latents takes 23.6 ms eagerly and 8.7 ms traced and frozen, a 22-latent guided step
88 -> 56 ms, and decoding 11 channels-last frames 176 -> 154 ms. The frames are the same to the last bit (the same
oneDNN kernels run; `tests/test_serve.py` renders through the explorer and compares with `mitosis-ldm
real2gen`). `torch.compile` gave 3 % after 116 s of compiling on first use; tracing takes about a second.

The graphs are traced at one batch size and hold for others, except where diffusers branches on the batch:
its upsampler makes a tensor contiguous from batch 64 on. Batches from `EAGER_FROM` on therefore run the
eager module. A trace that fails, or whose output differs from the eager module's on a check input, is not
used: the pipeline stays eager and the reason is returned.

The graphs run with the graph executor's optimisations off (`torch.jit.optimized_execution(False)`, a thread-local
switch). Left on, the executor profiles a graph's first call at each shape and then runs an optimised plan, in which
TorchScript's fuser (on by default for CUDA tensors) merges elementwise ops into kernels that round otherwise: the
check below would have compared only the first call. They are frozen without the folds that `torch.jit.freeze`
documents as not preserving numerics (`optimize_numerics=False`). On 2 cores neither costs time (the tests' small
pipeline, median of 5 x 20 calls: the UNet at batch 1, 11 and 22 3.07, 12.5 and 20.7 ms as run against 3.07, 12.4
and 19.7 ms through the optimised plan, eager 6.7, 17.8 and 29.4 ms).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

EAGER_FROM = 64  # diffusers' upsampler takes another branch from this batch size on


class _UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, class_labels):
        return self.unet(sample, timestep, class_labels=class_labels, return_dict=False)[0]


class _DecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class _EncoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        return self.vae.encode(images, return_dict=False)[0].parameters  # the posterior's moments


class _Traced:
    """An eager module with a frozen graph in front of one call; every other attribute is the eager module's."""

    def __init__(self, eager, graph):
        self.eager, self.graph = eager, graph
        self.traced_calls = self.eager_calls = 0

    def _run(self, traced: bool, graph, graph_args: tuple, eager_call, return_dict: bool, name: str = "sample",
             wrap=lambda out: out):
        """The eager call, or the graph's output wrapped like the eager module's (`.name`, or a 1-tuple)."""
        if not traced:
            self.eager_calls += 1
            return eager_call()
        self.traced_calls += 1
        out = wrap(_call(graph, *graph_args))
        return SimpleNamespace(**{name: out}) if return_dict else (out,)

    def __getattr__(self, name):
        return getattr(self.eager, name)


class TracedUNet(_Traced):
    """Called like the UNet (`unet(sample, t, class_labels=emb).sample`)."""

    def __call__(self, sample, timestep, class_labels=None, return_dict=True):
        traced = class_labels is not None and torch.is_tensor(timestep) and timestep.ndim == 1 \
            and len(sample) < EAGER_FROM
        return self._run(traced, self.graph, (sample, timestep, class_labels), lambda: self.eager(
            sample, timestep, class_labels=class_labels, return_dict=return_dict), return_dict)


class TracedVAE(_Traced):
    """The autoencoder with traced `encode` and `decode` graphs."""

    def __init__(self, eager, decoder, encoder):
        super().__init__(eager, decoder)
        self.encoder_graph = encoder

    def decode(self, latents, return_dict=True):
        return self._run(len(latents) < EAGER_FROM, self.graph, (latents,),
                         lambda: self.eager.decode(latents, return_dict=return_dict), return_dict)

    def encode(self, images, return_dict=True):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        # the graph gives the posterior's moments; the distribution around them is built as diffusers builds it
        return self._run(len(images) < EAGER_FROM, self.encoder_graph, (images,),
                         lambda: self.eager.encode(images, return_dict=return_dict), return_dict,
                         name="latent_dist", wrap=DiagonalGaussianDistribution)


def _call(graph, *args):
    """One call of a frozen graph, run as traced: no profiled, fused plan from the second call on."""
    with torch.jit.optimized_execution(False):
        return graph(*args)


def _frozen(module: torch.nn.Module, example: tuple):
    with warnings.catch_warnings():
        # torch marks jit tracing as deprecated in favour of torch.compile, which costs minutes per start here;
        # the tracer's shape warnings are the batch branch EAGER_FROM routes around
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False), optimize_numerics=False)


@torch.no_grad()
def trace_pipeline(pipe, batch: int = 22) -> str | None:
    """Swap in traced graphs of `pipe.unet` and `pipe.vae`'s decoder; None on success, else why not (eager kept)."""
    if isinstance(pipe.unet, TracedUNet):
        return None
    c, h, w = pipe.latent_shape
    device = pipe.device  # traced where the pipeline runs: its graphs hold that device's kernels
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn((batch, c, h, w), generator=gen).to(device)
    emb = pipe.label_embedder(torch.rand(batch, generator=gen).to(device))
    steps = torch.full((batch,), pipe.scheduler.config.num_train_timesteps // 2, dtype=torch.long, device=device)
    check = torch.randn((3, c, h, w), generator=gen).to(device)
    check_last = check.contiguous(memory_format=torch.channels_last)
    try:
        unet = _frozen(_UNetGraph(pipe.unet), (latents, steps, emb))
        # traced on the channels-last latents decode_latents hands it
        half = latents[: batch // 2].contiguous(memory_format=torch.channels_last)
        decoder = _frozen(_DecoderGraph(pipe.vae), (half,))
        size = pipe.image_shape[0]
        images = (torch.rand((2, 3, size, size), generator=gen) * 2 - 1).to(device)
        encoder = _frozen(_EncoderGraph(pipe.vae), (images,))
        # a shape and a timestep other than the traced ones must give the eager answer
        t3 = torch.tensor([0, 7, pipe.scheduler.config.num_train_timesteps - 1], device=device)
        same_unet = torch.equal(_call(unet, check, t3, emb[:3]), pipe.unet(check, t3, class_labels=emb[:3]).sample)
        same_decoder = torch.equal(_call(decoder, check_last), pipe.vae.decode(check_last).sample)
        check_images = (torch.rand((1, 3, size, size), generator=gen) * 2 - 1).to(device)
        same_encoder = torch.equal(_call(encoder, check_images), pipe.vae.encode(check_images).latent_dist.parameters)
    except Exception as error:  # noqa: BLE001 - any tracing failure leaves the eager pipeline, which is correct
        return f"tracing failed ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    if not (same_unet and same_decoder and same_encoder):
        return "the traced graph's output differs from the eager module's"
    pipe.unet = TracedUNet(pipe.unet, unet)
    pipe.vae = TracedVAE(pipe.vae, decoder, encoder)
    return None
