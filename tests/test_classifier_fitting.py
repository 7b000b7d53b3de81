"""The pieces of one member's fit (classifier/fitting.py): early stopping, validation logits, Platt scaling, lr."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_classifier import TINY, images
from torch import nn

from classifier.fitting import EarlyStopping, cosine_with_warmup, fit_platt, lr_scheduler, val_logits
from classifier.model import MitosisClassifier, ModelConfig
from mitosis_ldm.training import TrainConfig


def test_early_stopping_keeps_the_best_weights_and_counts_patience_past_min_delta():
    model = nn.Linear(1, 1, bias=False)
    early = EarlyStopping(model, patience=2, min_delta=0.1)

    def judge(weight: float, loss: float, step: int) -> bool:
        model.weight.data.fill_(weight)
        return early.update(loss, model, step)

    assert not judge(1.0, 1.0, 10)
    assert not judge(2.0, 0.95, 20)  # better, but by less than min_delta: not an improvement
    assert float(early.best_loss) == 1.0 and int(early.best_step) == 10 and float(early.best.weight) == 1.0
    assert not judge(3.0, 0.5, 30)   # an improvement resets the count
    assert int(early.bad_evals) == 0 and float(early.best.weight) == 3.0
    assert not judge(4.0, 0.45, 40)  # one pass without improvement: patience 2 not used up
    assert judge(5.0, 0.6, 50)       # the second one: stop
    assert int(early.best_step) == 30 and float(early.best.weight) == 3.0


def test_val_logits_judge_in_eval_mode_and_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = MitosisClassifier(ModelConfig(**TINY)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(5)
    got = val_logits(model, x, batch_size=2)
    assert model.training  # training goes on in train mode
    for key, value in model.state_dict().items():  # validation images never reach the BatchNorm statistics
        assert torch.equal(value, before[key]), key
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(x).permute(0, 3, 1, 2).float())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_val_logits_send_each_batch_to_the_models_device_and_give_float32_logits_on_the_cpu():
    # a GPU run once failed here: the CPU images met CUDA weights. The meta device stands in for the GPU.
    class OnAnotherDevice(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1, device="meta"))
            self.seen = []

        def forward(self, x):
            self.seen.append(x.device.type)
            return torch.full((len(x),), 0.5, dtype=torch.bfloat16)  # mixed precision leaves bf16 logits

    model = OnAnotherDevice()
    got = val_logits(model, images(5), batch_size=2)
    assert model.seen == ["meta"] * 3
    assert got.device.type == "cpu" and got.dtype == torch.float32 and got.shape == (5,)


def test_platt_scaling_recovers_a_known_scale_and_bias_from_soft_targets():
    logits = torch.linspace(-3, 3, 200)
    targets = torch.sigmoid(2.0 * logits - 1.0)  # soft targets: BCE is smallest exactly at scale 2, bias -1
    scale, bias = fit_platt(logits, targets)  # no prior on soft targets (with it: scale 1.81 here)
    assert scale == pytest.approx(2.0, abs=1e-3) and bias == pytest.approx(-1.0, abs=1e-3)


def test_platt_scaling_stays_finite_when_the_validation_split_is_separable():
    """Hard labels that the logits separate have no finite BCE optimum: an unsmoothed fit grows the scale until
    the calibrated scores are exactly 0 or 1 in float32. Platt's prior on hard targets, (N+ + 1) / (N+ + 2) and
    1 / (N- + 2), keeps every score short of certainty, near what N patches can show."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(50, generator=gen) - 3, torch.randn(50, generator=gen) + 3])
    targets = (logits > 0).float()
    scale, bias = fit_platt(logits, targets)
    probs = torch.sigmoid(scale * logits + bias)
    assert 0 < scale < 5 and abs(bias) < 1
    assert 1e-4 < float(probs.min()) and float(probs.max()) < 1 - 1e-4
    assert float(probs[targets == 1].mean()) == pytest.approx(51 / 52, abs=0.02)
    assert float(probs[targets == 0].mean()) == pytest.approx(1 / 52, abs=0.02)


def test_cosine_schedule_warms_up_then_decays_to_a_five_percent_floor():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    scheduler = lr_scheduler(opt, TrainConfig(lr=1.0, lr_schedule="cosine", lr_warmup_steps=4, max_steps=20))
    lrs = []
    for _ in range(25):  # past max_steps: early stopping may not end a member before the schedule's end
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[12] == pytest.approx(0.05 + 0.95 * 0.5)  # half way through the decay
    assert lrs[20:] == pytest.approx([0.05] * 5) and min(lrs) == pytest.approx(0.05)
    assert cosine_with_warmup(0, 10)(0) == 1.0 and np.isfinite(cosine_with_warmup(0, 0)(3))
