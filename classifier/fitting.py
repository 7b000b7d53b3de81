"""Pieces of one classifier member's fit: early stopping, validation logits, Platt calibration, the lr schedule.

Used by classifier/train.py; kept apart so that module holds the run (data, members, export) in one sitting.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mitosis_ldm.errors import UserError
from mitosis_ldm.training import TrainConfig

from .model import to_network_input


# -- early stopping ---------------------------------------------------------------

class EarlyStopping(nn.Module):
    """Best-so-far weights and patience counter, checkpointed with the run so resume is exact."""

    def __init__(self, model: nn.Module, patience: int, min_delta: float):
        super().__init__()
        self.best = copy.deepcopy(model).eval()
        for p in self.best.parameters():
            p.requires_grad_(False)
        self.patience, self.min_delta = patience, min_delta
        self.register_buffer("best_loss", torch.tensor(math.inf))
        self.register_buffer("best_step", torch.tensor(0))
        self.register_buffer("bad_evals", torch.tensor(0))

    def update(self, val_loss: float, model: nn.Module, step: int) -> bool:
        """Record a validation loss; True when training should stop."""
        if val_loss < float(self.best_loss) - self.min_delta:
            self.best.load_state_dict(model.state_dict())
            self.best_loss.fill_(val_loss)
            self.best_step.fill_(step)
            self.bad_evals.zero_()
        else:
            self.bad_evals += 1
        return int(self.bad_evals) >= self.patience


@torch.no_grad()
def val_logits(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """The model's float32 logits for uint8 (N, H, W, 3) images, on the CPU; each batch goes to the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model(to_network_input(images[i: i + batch_size]).to(device)).float().cpu()
                     for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def fit_platt(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Logit scale and bias minimising BCE on validation data (Platt scaling, two parameters).

    Hard targets (every one 0 or 1) take Platt's prior (Platt 1999): 1 becomes (N+ + 1) / (N+ + 2) and 0
    becomes 1 / (N- + 2), where N+ and N- count the split's mitotic and non-mitotic patches. Without it a
    split that the logits separate has no finite optimum, and the fit returns scores of exactly 0 and 1.
    Soft targets are left as they are: one target strictly between 0 and 1 at a logit other than 0 already
    makes the loss grow without bound with the scale, and on the demo's vote fractions the prior only
    loosened the calibration (test ECE against soft labels 0.0147 without it, 0.0179 with it).
    """
    targets = targets.float()
    if bool(((targets == 0) | (targets == 1)).all()):
        n_pos, n_neg = float(targets.sum()), float((1 - targets).sum())
        targets = targets * (n_pos + 1) / (n_pos + 2) + (1 - targets) / (n_neg + 2)
    scale = torch.ones((), requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([scale, bias], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(scale * logits + bias, targets)
        loss.backward()
        return loss

    opt.step(closure)
    return float(scale.detach()), float(bias.detach())


def lr_scheduler(opt, tcfg: TrainConfig):
    """train.lr_schedule: `cosine` here keeps a 5% floor (early stopping may end a member late in the schedule);
    any other name is diffusers' get_scheduler, as in the other stages."""
    if tcfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(tcfg.lr_warmup_steps, tcfg.max_steps))
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(tcfg.lr_schedule, opt, num_warmup_steps=tcfg.lr_warmup_steps,
                             num_training_steps=tcfg.max_steps)
    except ValueError:
        raise UserError(f"train.lr_schedule: '{tcfg.lr_schedule}' is not a schedule name (cosine, linear, "
                        f"constant, constant_with_warmup, ...)") from None


def cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
