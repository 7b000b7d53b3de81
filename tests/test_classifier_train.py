"""Classifier training end to end: the real entry points, job-array members, resume after SIGKILL, bad data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest
from classifier_data import make_toy_dataset
from conftest import REPO, accelerate_cmd, launch_output

from classifier import train
from classifier.model import ClassifierEnsemble, MitosisClassifier

TINY = ["--set", "model.name=resnet10t", "--set", "model.model_kwargs={channels: [8, 16, 16, 32], stem_width: 8}",
        "--set", "model.input_size=32", "--set", "model.upsample=1", "--set", "train.batch_size=16",
        "--set", "train.lr_warmup_steps=5", "--set", "train.log_every=5"]


def tiny_args(dataset, out, steps=30, members=2, every=10, *extra):
    return [*TINY, "--set", f"data.dataset={dataset}", "--out", str(out), "--set", f"train.max_steps={steps}",
            "--set", f"ensemble.members={members}", "--set", f"ensemble.eval_every={every}",
            "--set", f"train.checkpoint_every={every}", *extra]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("data") / "toy", n=200, size=32)


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cls"
    train.main(tiny_args(toy, out, 40, 2))
    return out


def test_one_launch_trains_every_member_and_exports_the_folder(trained, toy):
    model = trained / "model"
    meta = json.loads((model / "config.json").read_text())
    assert meta["format"] == "mitosis-ldm/classifier" and meta["members"] == 2
    assert meta["member_seeds"] == [0, 1] and meta["label_mode"] == "soft"
    assert meta["trained_on"]["content_hash"] == json.loads((toy / "dataset.json").read_text())["content_hash"]
    for k in range(2):
        record = json.loads((trained / "members" / f"member-{k}" / "member.json").read_text())
        assert record["seed"] == k and record["steps"] <= 40 and np.isfinite(record["best_val_loss"])
        logged = [json.loads(line) for line in open(trained / "members" / f"member-{k}" / "logs" / "metrics.jsonl")]
        assert any("val_loss" in rec for rec in logged)
    ens = ClassifierEnsemble.from_pretrained(trained)
    from patches.dataset import PatchDataset

    test = PatchDataset(toy, split="test")
    probs = ens.predict(test.uint8())
    assert probs.shape == (len(test), 2) and (probs.std(1) > 0).any()
    # 40 steps on a toy task whose label is the nucleus darkness: the score must already rank it
    from scipy.stats import spearmanr

    order = np.argsort(test.indices)
    assert spearmanr(probs.mean(1), test.true_degree[order]).statistic > 0.5


def check_exported_member(run, toy, k: int) -> dict:
    """Member k of RUN/model/ holds the weights early stopping judged best, with its own Platt calibration."""
    import torch
    import torch.nn.functional as F
    from patches.dataset import PatchDataset

    from classifier.fitting import fit_platt

    record = json.loads((run / "members" / f"member-{k}" / "member.json").read_text())
    assert json.loads((run / "model" / "config.json").read_text())["calibration"][k] == record["calibration"]
    val = PatchDataset(toy, split="val")
    targets = torch.from_numpy(val.labels()).double()  # soft labels
    calibrated = torch.from_numpy(ClassifierEnsemble.from_pretrained(run).logits(val.uint8())[:, k]).double()
    assert F.binary_cross_entropy_with_logits(calibrated, targets).item() == pytest.approx(
        record["calibrated_val_loss"], rel=1e-4)
    scale, bias = record["calibration"]["scale"], record["calibration"]["bias"]
    raw = (calibrated - bias) / scale
    assert F.binary_cross_entropy_with_logits(raw, targets).item() == pytest.approx(record["best_val_loss"], rel=1e-4)
    # Platt scaling is fitted to the soft labels the member was judged on
    assert fit_platt(raw.float(), targets.float()) == pytest.approx((scale, bias), rel=1e-2, abs=1e-3)
    assert record["calibrated_val_loss"] <= record["best_val_loss"] + 1e-6  # Platt can keep scale 1, bias 0
    return record


def test_exported_members_are_the_best_weights_with_their_own_calibration(trained, toy):
    for k in range(2):
        check_exported_member(trained, toy, k)


def test_an_early_stopped_member_exports_its_best_weights_not_its_last(toy, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(toy, out, 40, 1, 2, "--set", "ensemble.patience=1"))
    record = check_exported_member(out, toy, 0)
    assert record["stopped_early"] and record["best_step"] < record["steps"] < 40


def test_a_training_step_sees_soft_targets_and_images_in_the_scoring_range(toy, tmp_path, monkeypatch):
    import torch
    import torch.nn.functional as F

    targets, pixels = [], []

    def recording_bce(logits, target, *args, **kwargs):
        if logits.requires_grad:  # a training step, not a validation pass
            targets.append(target.detach().clone())
        return F.binary_cross_entropy_with_logits(logits, target, *args, **kwargs)

    class Recording(MitosisClassifier):
        def forward(self, images):
            if torch.is_grad_enabled():
                pixels.append((float(images.min()), float(images.max())))
            return super().forward(images)

    monkeypatch.setattr(train, "F", SimpleNamespace(binary_cross_entropy_with_logits=recording_bce))
    monkeypatch.setattr(train, "MitosisClassifier", Recording)
    train.main(tiny_args(toy, tmp_path / "run", 4, 1, 2))
    seen = torch.cat(targets)
    assert len(seen) == 4 * 16 and ((seen > 0) & (seen < 1)).any()  # votes 1/3 and 2/3 stay soft
    # uint8 range, as score and evaluate feed the network (the toy background is about 230)
    assert len(pixels) == 4 and min(lo for lo, _ in pixels) >= 0 and max(hi for _, hi in pixels) > 200


def test_overwrite_starts_a_finished_run_again(toy, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(toy, out, 4, 2, 2))
    train.main(tiny_args(toy, out, 7, 1, 5, "--overwrite"))
    assert not (out / "members" / "member-1").exists()  # nothing of the first run is left to be mixed in
    assert json.loads((out / "model" / "config.json").read_text())["members"] == 1
    record = json.loads((out / "members" / "member-0" / "member.json").read_text())
    assert record["steps"] == 7
    logged = [json.loads(line) for line in open(out / "members" / "member-0" / "logs" / "metrics.jsonl")]
    # judged at step 5 and at the last step, 7, which is off the eval_every grid
    assert [rec["step"] for rec in logged if "val_loss" in rec] == [5, 7]


def test_existing_run_needs_resume_or_overwrite(trained, toy, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(toy, trained, 40, 2))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--resume latest" in err[0]
    # a finished run resumed is a no-op that re-assembles the same folder
    before = (trained / "model" / "member-0.safetensors").read_bytes()
    train.main(tiny_args(toy, trained, 40, 2, 10, "--resume", "latest"))
    assert (trained / "model" / "member-0.safetensors").read_bytes() == before


def test_member_flag_trains_one_member_and_the_last_one_assembles(toy, tmp_path, capsys):
    out = tmp_path / "array"
    train.main(tiny_args(toy, out, 10, 2, 5, "--member", "1"))
    assert (out / "members" / "member-1" / "member.json").exists()
    assert not (out / "members" / "member-0").exists() and not (out / "model").exists()
    assert "1 of 2 members finished" in capsys.readouterr().out
    train.main(tiny_args(toy, out, 10, 2, 5, "--member", "0"))
    meta = json.loads((out / "model" / "config.json").read_text())
    assert meta["member_seeds"] == [0, 1]
    with pytest.raises(SystemExit):
        train.main(tiny_args(toy, out, 10, 2, 5, "--member", "2"))
    assert "--member: 2 is outside 0..1" in capsys.readouterr().err


def test_sigkill_then_resume_continues_from_the_last_checkpoint(toy, tmp_path):
    out = tmp_path / "killed"
    args = tiny_args(toy, out, 80, 1, 10, "--set", "ensemble.patience=1000")
    # its own process group, so that SIGKILL reaches the launcher and the training process it spawned
    proc = subprocess.Popen(accelerate_cmd("classifier.train", *args), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = out / "members" / "member-0" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(p.name.startswith("checkpoint-") for p in ckpts.iterdir()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # let the kernel reap the group before we look
    steps = sorted(int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("checkpoint-"))
    assert steps and steps[-1] < 80, "the run finished before it could be killed"
    assert not (out / "model").exists()
    done = subprocess.run(accelerate_cmd("classifier.train", *args, "--resume", "latest"), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"(step {steps[-1]})" in done.stdout and f"starting at step {steps[-1]}" in done.stdout
    assert "starting at step 0" not in done.stdout
    assert (out / "model" / "config.json").exists()
    assert json.loads((out / "members" / "member-0" / "member.json").read_text())["steps"] == 80


def test_labels_with_missing_labels_are_refused_for_training(tmp_path, capsys):
    data = make_toy_dataset(tmp_path / "partial", n=60, size=32, unlabelled_every=7)
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(data, tmp_path / "run", 5, 1))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labels.csv: field 'label' is empty for" in err[0] and "first id 'toy-0-" in err[0]
    assert not (tmp_path / "run").exists()


def test_generated_data_and_size_mismatch_are_refused(toy, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(tiny_args(toy, tmp_path / "run", 5, 1) + ["--set", "model.input_size=64"])
    assert "model.input_size: is 64" in capsys.readouterr().err
    fake = tmp_path / "gen"
    fake.mkdir()
    for name in ("patches.npy", "labels.csv"):
        (fake / name).write_bytes((toy / name).read_bytes())
    meta = json.loads((toy / "dataset.json").read_text())
    (fake / "dataset.json").write_text(json.dumps({**meta, "source": "generated"}))
    with pytest.raises(SystemExit):
        train.main(tiny_args(fake, tmp_path / "run", 5, 1))
    assert "never trains on generated patches" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_shipped_configs_load():
    from mitosis_ldm.config import load_config

    demo = load_config(train.ClassifierConfig, REPO / "configs" / "demo" / "classifier.yaml")
    full = load_config(train.ClassifierConfig, REPO / "configs" / "full" / "classifier.yaml")
    assert demo.model.input_size == 64 and demo.ensemble.members >= 2
    assert full.model.name == "resnet34" and full.model.upsample == 4 and full.model.normalisation == "percentile"


def test_two_processes_train_over_gloo(toy, tmp_path):
    out = tmp_path / "ddp"
    done = subprocess.run(accelerate_cmd("classifier.train", *tiny_args(toy, out, 10, 1, 5), processes=2),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, launch_output(done.stderr)
    run = json.loads((out / "members" / "member-0" / "run.json").read_text())
    assert run["num_processes"] == 2 and run["process_ranks"] == [0, 1]
    assert ClassifierEnsemble.from_pretrained(out).members == 1
