"""Autoencoder losses: L1 + (1 - SSIM) + KL, optional patch-GAN (LDM style) and optional LPIPS.

The reconstruction terms are means over pixels; the KL term is the posterior's
KL summed over latent elements and divided by the number of pixels, so that
`kl_weight` = 1e-6 matches the latent-diffusion autoencoder's balance (there
both terms are sums per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from mitosis_ldm.errors import UserError


@dataclass
class LossConfig:
    l1: float = 1.0
    ssim: float = 1.0          # weight of (1 - SSIM)
    kl: float = 1e-6
    lpips: float = 0.0         # > 0 needs torchvision backbone weights already in the torch hub cache
    lpips_net: str = "alex"    # alex | vgg | squeeze
    gan: float = 0.0           # > 0 turns on the patch-GAN hinge loss
    gan_start: int = 2000      # step at which the discriminator joins (LDM: after reconstructions settle)
    disc_lr: float = 2e-4
    disc_layers: int = 2
    disc_channels: int = 32


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of images in [-1, 1] (B, 3, H, W); Gaussian window shrunk for small crops.

    Computed on [0, 1]: SSIM's luminance term assumes non-negative intensities (on [-1, 1]
    an image and its negative score about +0.7).
    """
    kernel = min(11, min(pred.shape[-2:]) // 2 * 2 - 1)
    return structural_similarity_index_measure((pred.float() + 1) / 2, (target.float() + 1) / 2, data_range=1.0,
                                               kernel_size=kernel)


class PatchDiscriminator(nn.Module):
    """Pix2pix/LDM "NLayer" patch discriminator (hand-written: no maintained library ships it)."""

    def __init__(self, channels: int = 32, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, layers + 1):
            nxt = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(width, nxt, 4, stride, 1, bias=False), nn.GroupNorm(8, nxt), nn.LeakyReLU(0.2, True)]
            width = nxt
        mods += [nn.Conv2d(width, 1, 4, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1, h, w) logits
        return self.net(x)

    def output_size(self, size: int) -> int:
        """The side of the logit map for a `size`-pixel input (< 1: the input is too small for this depth)."""
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                size = (size + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
                if size < 1:
                    return size
        return size


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_gan_loss(disc: nn.Module, recon: torch.Tensor) -> torch.Tensor:
    """-D(reconstruction): the autoencoder's adversarial term. The discriminator's parameters stay out of its graph,
    so the autoencoder's backward pass leaves them no gradient (one that would teach D to call reconstructions real).
    """
    flags = [p.requires_grad for p in disc.parameters()]
    for p in disc.parameters():
        p.requires_grad_(False)
    try:
        return -disc(recon).mean()
    finally:
        for p, flag in zip(disc.parameters(), flags):
            p.requires_grad_(flag)


def discriminator_step(disc: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, recon: torch.Tensor,
                       backward=torch.Tensor.backward) -> float:
    """One hinge-loss update of the discriminator, real `images` against the detached reconstructions, from
    cleared gradients: the step follows the discriminator's own loss only. Returns the loss."""
    opt.zero_grad(set_to_none=True)
    d_loss = hinge_d_loss(disc(images), disc(recon.detach()))
    backward(d_loss)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return d_loss.item()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """LDM's balance: ||grad rec|| / ||grad gan|| at the decoder's last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach()


def build_lpips(net: str) -> nn.Module:
    """torchmetrics LPIPS, only if the backbone's pretrained weights are already on disk (no downloads)."""
    import torchvision.models as tvm
    from torch.hub import get_dir

    weights = {"alex": tvm.AlexNet_Weights.IMAGENET1K_V1, "vgg": tvm.VGG16_Weights.IMAGENET1K_V1,
               "squeeze": tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1}
    if net not in weights:
        raise UserError(f"loss.lpips_net: must be alex, vgg or squeeze, got '{net}'")
    cached = Path(get_dir()) / "checkpoints" / Path(weights[net].url).name
    if not cached.exists():
        raise UserError(f"loss.lpips: needs the {net} backbone weights at {cached} (never downloaded here); "
                        f"copy them there or set loss.lpips=0")
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=False)
    metric.requires_grad_(False)
    return metric
