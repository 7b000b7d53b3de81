"""Work that a training run does besides its steps runs on the run's device. Where no GPU is at hand, the meta
device stands in for one."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch


def test_the_training_preview_is_sampled_on_the_runs_device(tmp_path, monkeypatch):
    from diffusion.export import write_preview
    from diffusion.model import Denoiser, ModelConfig, build_models
    from diffusion.pipeline import MitosisPipeline
    from diffusion.train import DiffusionTrainConfig, PreviewConfig, SampleConfig, make_noise_scheduler
    from test_diffusion import make_vae

    sampled_on = []

    def transitions(self, seeds, conditions, *args, **kwargs):
        sampled_on.append(self.device.type)
        return np.zeros((len(seeds), len(conditions), 64, 64, 3), np.uint8)

    monkeypatch.setattr(MitosisPipeline, "transitions", transitions)
    cfg = DiffusionTrainConfig(preview=PreviewConfig(seeds=[0], conditions=3), sample=SampleConfig(steps=3))
    torch.manual_seed(0)
    model = Denoiser(*build_models(ModelConfig(preset="tiny"), 4, 16))
    run = SimpleNamespace(run_dir=tmp_path / "run", device=torch.device("meta"))
    write_preview(run, model, None, make_noise_scheduler(cfg.diffusion), make_vae(tmp_path / "vae"),
                  {"image_size": 64, "latent_shape": [4, 16, 16], "prediction_type": "v_prediction"}, cfg, 2)
    assert sampled_on == ["meta"] and (tmp_path / "run" / "previews" / "step-000002.png").exists()


def test_scoring_sends_each_batch_to_the_ensembles_device():
    from classifier.model import ClassifierEnsemble, MitosisClassifier, ModelConfig
    from test_classifier_fitting import TINY

    torch.manual_seed(0)
    members = [MitosisClassifier(ModelConfig(**TINY)) for _ in range(2)]
    ensemble = ClassifierEnsemble(ModelConfig(**TINY), members, [0, 1]).to("meta")
    seen = []
    for member in members:
        member.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].device.type))
    size = ensemble.patch_size
    # every member computes on the ensemble's device: the first thing to fail is copying the scores out
    with pytest.raises(NotImplementedError, match="meta"):
        ensemble.predict(np.zeros((3, size, size, 3), np.uint8))
    assert seen == ["meta", "meta"]


def test_the_report_puts_the_ensemble_and_the_floors_autoencoder_on_the_process_device(tmp_path, monkeypatch):
    import report.cli
    from classifier.model import ClassifierEnsemble, MitosisClassifier, ModelConfig
    from diffusion.pipeline import MitosisPipeline
    from report.against_real import reconstruction_features
    from test_classifier_fitting import TINY

    torch.manual_seed(0)
    ClassifierEnsemble(ModelConfig(**TINY), [MitosisClassifier(ModelConfig(**TINY))], [0]).save_pretrained(
        tmp_path / "classifier")
    on_meta = SimpleNamespace(device=torch.device("meta"))
    monkeypatch.setattr(report.cli, "process_state", lambda: on_meta, raising=False)
    _, ensemble = report.cli.load_classifier(tmp_path / "classifier")
    assert ensemble.device.type == "meta"

    moved_to = []
    pipe = SimpleNamespace(to=lambda device: moved_to.append(device) or pipe)
    monkeypatch.setattr(MitosisPipeline, "from_pretrained", classmethod(lambda cls, path: pipe))
    monkeypatch.setattr("report.against_real.reconstructed_features", lambda *args: np.zeros((1, 4)))
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "pipeline.json").write_text("{}")
    folder = SimpleNamespace(role="transitions", manifest={"pipeline": str(tmp_path / "pipeline")})
    reconstruction_features([folder], np.zeros((1, 8, 8, 3), np.uint8), ensemble, 4, print)
    assert [d.type for d in moved_to] == ["meta"]


def test_the_explorers_graphs_are_traced_on_the_pipelines_device(tmp_path, monkeypatch):
    import diffusion.traced as traced
    from diffusion.pipeline import MitosisPipeline
    from tiny_artifacts import pipeline

    pipe = MitosisPipeline.from_pretrained(pipeline(tmp_path / "pipeline")).to("meta")
    seen = []

    def frozen(module, example):  # the examples each graph is traced on; eager modules stand in for the graphs
        seen.extend(t.device.type for t in example)
        return module

    monkeypatch.setattr(traced, "_frozen", frozen)
    reason = traced.trace_pipeline(pipe)
    assert len(seen) == 5 and set(seen) == {"meta"}  # the UNet's latents, timesteps, labels; decoder; encoder
    assert reason is not None and "traced" not in type(pipe.unet).__name__.lower()  # meta values never compare equal
