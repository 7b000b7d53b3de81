"""bench/full_profile.py: seconds per step from a training run's metrics log, and the plan of stages it runs."""

from __future__ import annotations

import json

from conftest import load_bench


def test_step_rate_is_the_slope_of_the_first_time_each_step_was_logged(tmp_path):
    profile = load_bench("full_profile")
    logs = tmp_path / "logs"
    logs.mkdir()
    rows = [{"step": 0, "time_s": 50.0}, {"step": 10, "time_s": 60.0, "loss": 1.0}, {"step": 20, "time_s": 62.0},
            {"step": 30, "time_s": 64.0}, {"step": 30, "time_s": 90.0, "psnr": 20.0}]  # the end-of-run evaluation
    (logs / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert profile.step_rate(tmp_path, first=10) == (64.0 - 60.0) / 20  # start-up and evaluation left out
    assert profile.step_rate(tmp_path, first=10, last=20) == 0.2
    assert profile.step_rate(tmp_path, first=30) is None  # one logged step gives no rate


def test_each_training_stage_runs_its_own_step_count_and_the_report_follows_the_scores(tmp_path, monkeypatch):
    profile = load_bench("full_profile")
    trained, commands = {}, []

    def training(name, module, config, sets, out, logs, steps, smoke):
        trained[name] = (steps, sets)
        return {}

    monkeypatch.setattr(profile, "training", training)
    monkeypatch.setattr(profile, "command", lambda name, args, logs, **extra: commands.append(args[0]) or {})
    monkeypatch.setattr(profile, "transitions", lambda *args, **kwargs: {})
    profile.main(["--dataset", str(tmp_path / "synth"), "--root", str(tmp_path / "run"), "--steps", "200",
                  "--autoencoder-steps", "60", "--classifier-steps", "30"])
    assert {name: steps for name, (steps, _) in trained.items()} == {"autoencoder": 60, "classifier": 30,
                                                                     "diffusion": 200}
    assert "loss.gan_start=40" in trained["autoencoder"][1]  # the last third of the autoencoder's own steps
    assert "ensemble.eval_every=10" in trained["classifier"][1]
    assert commands == ["cache", "real2gen", "posterior", "score", "report"]
    saved = json.loads((tmp_path / "run" / "full_profile.json").read_text())
    assert list(saved["stages"]) == ["autoencoder", "classifier", "cache", "diffusion", "transitions", "real2gen",
                                     "posterior", "score", "report", "transitions_cpu_peer"]
