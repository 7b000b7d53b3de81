"""Classifier model, ensemble folder round trip, normalisation, wrong sizes and the evaluation metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from classifier.evaluate import soft_ece, weighted_auroc, weighted_average_precision
from classifier.model import ClassifierEnsemble, MitosisClassifier, ModelConfig, Preprocess, fit_size
from mitosis_ldm.errors import UserError

TINY = dict(name="resnet10t", model_kwargs={"channels": [8, 16, 16, 32], "stem_width": 8}, input_size=32, upsample=1)


def tiny_ensemble(k: int = 2, **overrides) -> ClassifierEnsemble:
    cfg = ModelConfig(**{**TINY, **overrides})
    members = []
    for seed in range(k):
        torch.manual_seed(seed)
        members.append(MitosisClassifier(cfg))
    return ClassifierEnsemble(cfg, members, list(range(k)), [(1.5, -0.2), (0.8, 0.3)][:k])


def images(n: int = 6, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_round_trip_predicts_identically_and_members_differ(tmp_path):
    ens = tiny_ensemble()
    x = images()
    before, feats = ens.predict(x), ens.features(x)
    assert before.shape == (6, 2) and before.dtype == np.float32
    assert ((before >= 0) & (before <= 1)).all()
    assert feats.shape == (6, ens.feature_dim) and np.isfinite(feats).all()
    assert not np.allclose(before[:, 0], before[:, 1])  # different seeds, different members
    ens.save_pretrained(tmp_path / "run" / "model")
    meta = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert meta["format"] == "mitosis-ldm/classifier" and meta["member_seeds"] == [0, 1]
    assert meta["normalisation"]["kind"] == "percentile" and meta["model_name"] == "resnet10t"
    assert sorted(p.name for p in (tmp_path / "run" / "model").iterdir()) == [
        "config.json", "integrity.json", "member-0.safetensors", "member-1.safetensors"]
    for path in (tmp_path / "run" / "model", tmp_path / "run"):  # the folder itself or its run folder
        loaded = ClassifierEnsemble.from_pretrained(path)
        np.testing.assert_allclose(loaded.predict(x), before, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(loaded.features(x), feats, rtol=1e-5, atol=1e-5)
        assert loaded.members == 2 and loaded.patch_size == 32 and loaded.calibration == ens.calibration


def test_each_member_gets_its_own_calibration_and_features_are_the_member_mean():
    ens = tiny_ensemble(k=2)
    x = images(3)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        for k, member in enumerate(ens.member_models):  # member k's scale and bias on member k's logit
            raw = torch.sigmoid(member(t)).numpy()
            a, b = ens.calibration[k]
            expected = 1 / (1 + np.exp(-(a * np.log(raw / (1 - raw)) + b)))
            np.testing.assert_allclose(ens.predict(x)[:, k], expected, rtol=1e-4)
        per_member = np.stack([member.features(t).numpy() for member in ens.member_models])  # (K, N, D)
    assert not np.allclose(per_member[0], per_member[1])
    np.testing.assert_allclose(ens.features(x), per_member.mean(0), rtol=1e-5, atol=1e-6)


def test_a_confident_calibrated_logit_scores_0_or_1_without_an_overflow_warning(monkeypatch):
    import warnings

    ens = tiny_ensemble(k=2)
    logits = np.array([[-120.0, 120.0], [0.0, -3.0]], np.float32)  # a steep Platt scale gives such logits
    monkeypatch.setattr(ens, "logits", lambda images, batch_size=256: logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow RuntimeWarning becomes a failure
        probs = ens.predict(images(2))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, [[0.0, 1.0], [0.5, 1 / (1 + np.exp(3.0))]], atol=1e-7)


def test_meanstd_folder_round_trip_keeps_its_mean_and_std(tmp_path):
    ens = tiny_ensemble(normalisation="meanstd", mean=[0.6, 0.5, 0.4], std=[0.2, 0.25, 0.3])
    x = images()
    loaded = ClassifierEnsemble.from_pretrained(ens.save_pretrained(tmp_path / "model"))
    assert (loaded.cfg.mean, loaded.cfg.std) == ([0.6, 0.5, 0.4], [0.2, 0.25, 0.3])
    np.testing.assert_allclose(loaded.predict(x), ens.predict(x), rtol=1e-5, atol=1e-6)


def drop_a_weight(folder):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "member-1.safetensors"))
    state.pop(sorted(state)[-1])
    save_file(state, str(folder / "member-1.safetensors"))


@pytest.mark.parametrize("edit, needle", [
    (lambda folder: edit_config(folder, members=3), "field 'members' must be the number of member_seeds (2)"),
    (lambda folder: edit_config(folder, calibration=[{"scale": 1.0, "bias": 0.0}]),
     "field 'calibration' must be one entry per member (2)"),
    (lambda folder: edit_config(folder, feature_dim=999), "field 'feature_dim' is 999 but 'resnet10t' has 32"),
    (drop_a_weight, "member-1.safetensors: does not fit 'resnet10t' (missing ["),
])
def test_folder_contradicting_itself_is_one_line_naming_the_field(tmp_path, edit, needle):
    # a member dropped from the mean, features of the wrong size, or a member scored with random weights
    folder = tiny_ensemble().save_pretrained(tmp_path / "model")
    (folder / "integrity.json").unlink()  # hand-edited folders: reach the parser, not the hash check
    edit(folder)
    with pytest.raises(UserError) as err:
        ClassifierEnsemble.from_pretrained(folder)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_config_of_zero_width_layers_is_the_one_error_line_without_torchs_warnings(tmp_path):
    # torch warned "Initializing zero-element tensors is a no-op" twice before the weights were refused
    import warnings

    folder = tiny_ensemble().save_pretrained(tmp_path / "model")
    (folder / "integrity.json").unlink()
    meta = json.loads((folder / "config.json").read_text())
    edit_config(folder, model_kwargs={**meta["model_kwargs"], "channels": [8, 0, 8, 8]})
    with warnings.catch_warnings(record=True) as shown, pytest.raises(UserError, match="does not fit 'resnet10t'"):
        warnings.simplefilter("always")
        ClassifierEnsemble.from_pretrained(folder)
    assert [str(w.message) for w in shown] == []
    from mitosis_ldm.artifacts import held_warnings

    with warnings.catch_warnings(record=True) as shown:  # a load that succeeds shows what it held
        warnings.simplefilter("always")
        with held_warnings():
            warnings.warn("held until the end")
            assert shown == []
    assert [str(w.message) for w in shown] == ["held until the end"]


def edit_config(folder, **fields):
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, **fields}))


def test_normalisations_and_upsampling():
    x = torch.from_numpy(images(4)).permute(0, 3, 1, 2).float()  # (4, 3, 32, 32) in [0, 255]
    pct = Preprocess(ModelConfig(**{**TINY, "upsample": 4}))(x)
    assert pct.shape == (4, 3, 128, 128)
    x[1] *= 0.5  # a paler image: each image is divided by its own percentile, not the batch's
    plain = Preprocess(ModelConfig(**TINY))(x)
    np.testing.assert_allclose(torch.quantile(plain.flatten(1), 0.99, dim=1).numpy(), 1.0, rtol=1e-5)
    torch.testing.assert_close(plain[1:2], Preprocess(ModelConfig(**TINY))(x[1:2]))
    ms = Preprocess(ModelConfig(**{**TINY, "normalisation": "meanstd"}))(x)
    np.testing.assert_allclose(ms[:, 0].numpy(), (x[:, 0].numpy() / 255 - 0.485) / 0.229, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="model.normalisation"):
        Preprocess(ModelConfig(**{**TINY, "normalisation": "zscore"}))


def test_wrong_size_rule_crops_larger_and_refuses_smaller():
    big = images(1, 40)[0]
    np.testing.assert_array_equal(fit_size(big, 32), big[4:36, 4:36])
    ens = tiny_ensemble()
    np.testing.assert_allclose(ens.predict(big[None]), ens.predict(big[None, 4:36, 4:36]), rtol=1e-6)
    with pytest.raises(UserError, match="smaller than the classifier's input 32x32"):
        fit_size(images(1, 24)[0], 32, "x.png")


def test_unknown_model_and_unreachable_hub_are_one_line_errors(monkeypatch):
    with pytest.raises(UserError, match="model.name: 'resnet_nope'"):
        MitosisClassifier(ModelConfig(name="resnet_nope"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    with pytest.raises(UserError, match="model.pretrained: cannot reach the model hub"):
        MitosisClassifier(ModelConfig(**{**TINY, "pretrained": True}))


def test_soft_metrics_reduce_to_the_hard_ones_on_binary_labels():
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.4).astype(np.float64)
    score = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    assert weighted_auroc(score, y) == pytest.approx(float(binary_auroc(torch.tensor(score), torch.tensor(y).long())))
    assert weighted_average_precision(score, y) == pytest.approx(
        float(binary_average_precision(torch.tensor(score), torch.tensor(y).long())), abs=1e-6)
    # a soft label of 0.5 on every patch: no ranking information -> AUROC 1/2
    assert weighted_auroc(score, np.full(200, 0.5)) == pytest.approx(0.5)
    # probabilities equal to the soft labels are perfectly calibrated; shifted ones are not
    soft = rng.random(500)
    assert soft_ece(soft, soft, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert soft_ece(np.clip(soft + 0.2, 0, 1), soft, 10)[0] > 0.1


def test_metrics_on_a_hand_worked_example():
    from scipy.stats import spearmanr

    from classifier.evaluate import all_metrics

    prob = np.array([0.95, 0.35, 0.65, 0.25, 0.15])  # one patch per calibration bin
    hard = np.array([1.0, 1.0, 0.0, 0.0, 0.0])
    soft = np.array([1.0, 0.5, 0.5, 0.0, 0.0])
    degree = np.array([0.1, 0.2, 0.3, 0.4, 0.5])  # ranks the patches unlike the soft label
    m = all_metrics(prob, soft, hard, degree, n_bins=10)
    assert m["hard"]["auroc"] == pytest.approx(5 / 6)
    assert m["hard"]["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # recall 1/2, specificity 2/3
    assert m["hard"]["brier"] == pytest.approx((0.05 ** 2 + 2 * 0.65 ** 2 + 0.25 ** 2 + 0.15 ** 2) / 5)
    assert m["hard"]["ece"] == pytest.approx((0.05 + 0.65 + 0.65 + 0.25 + 0.15) / 5)  # mean |p - y|, l1 norm
    # soft labels: patch 1 and 2 are half a positive and half a negative each
    assert m["soft"]["balanced_accuracy"] == pytest.approx(((1 + 0.5) / 2 + (0.5 + 1 + 1) / 3) / 2)
    assert m["soft"]["brier"] == pytest.approx((0.05 ** 2 + 3 * 0.15 ** 2 + 0.25 ** 2) / 5)
    assert m["soft"]["ece"] == pytest.approx((0.05 + 0.15 + 0.15 + 0.25 + 0.15) / 5)
    assert m["spearman_soft_label"] == pytest.approx(spearmanr(prob, soft).statistic)
    assert m["spearman_true_degree"] == pytest.approx(spearmanr(prob, degree).statistic)
    assert m["spearman_true_degree"] < 0 < m["spearman_soft_label"]
