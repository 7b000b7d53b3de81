"""bench/guidance_study.py: each setting's numbers come from the report's own code, off-domain frames included."""

from __future__ import annotations

import numpy as np
import pytest

from patches.dataset import SplitConfig, build_dataset
from report.build import ReportConfig

from conftest import load_bench
from report_helpers import FakeEnsemble, draw_nucleus, synth_shard

SIZE = 32


@pytest.fixture(scope="module")
def study():
    return load_bench("guidance_study")


def test_a_frame_from_another_domain_is_counted_at_its_seed_and_condition(study, tmp_path):
    dataset = build_dataset(tmp_path / "ds", [("a", synth_shard, {"n": 400, "size": SIZE, "seed": 1})],
                            patch_size=SIZE, margin=0, meta={"source": "fake"},
                            split=SplitConfig(mode="random", val=0.1, test=0.3), progress=False)
    cfg = ReportConfig(bootstrap=50, label_response_min_count=2, frechet_min_count=2, frechet_repeats=2)
    classifier = FakeEnsemble(SIZE)
    real = study.held_out(dataset, classifier, cfg, np.random.default_rng(0))
    assert real["train_pixels"].shape[1] == SIZE * SIZE * 3 and len(real["distances"]) == len(real["soft"])

    seeds, conditions = [10, 11, 12, 13, 14, 15], np.linspace(0, 1, 5)
    frames = np.stack([np.stack([draw_nucleus(c, 5000 + s, SIZE) for c in conditions]) for s in seeds])
    frames[4, 2] = np.array([110, 60, 120], np.uint8)     # seed 14 at y = 0.5: the slide's purple, no nucleus
    result = study.measure(frames, conditions, seeds, classifier, real, cfg)

    assert 14 in result["outside_seeds"] and set(result["outside_seeds"]) <= set(seeds)
    assert len(result["outside_by_condition"]) == len(conditions) and result["outside_by_condition"][2] >= 1
    assert sum(result["outside_by_condition"]) == round(result["outside_share"] * frames.shape[0] * frames.shape[1])
    assert result["outside_beyond_all_share"] >= 1 / 30
    assert result["label_response_error"] is not None and result["frechet_ratio"] is not None
    assert all(v is None for v in result["autoencoder_floor_by_bin"])  # no pipeline given: no floor
    # one ratio per condition, each with its n
    assert len(result["frechet_ratio_by_condition"]) == len(result["frechet_n_by_condition"]) == len(conditions)
    assert all(n <= len(seeds) for n in result["frechet_n_by_condition"])  # a condition has one frame per seed

    frames[4, 2] = draw_nucleus(0.5, 5014, SIZE)         # the same seed drawn like the others
    clean = study.measure(frames, conditions, seeds, classifier, real, cfg)
    assert clean["outside_beyond_all_share"] < result["outside_beyond_all_share"]
    # the off-domain frame sat at y = 0.5: redrawing it moves that condition's ratio, not y = 0's
    assert clean["frechet_ratio_by_condition"][0] == result["frechet_ratio_by_condition"][0]
    assert clean["frechet_ratio_by_condition"][2] < result["frechet_ratio_by_condition"][2]


def test_a_setting_takes_the_null_terms_middle_share(study):
    from mitosis_ldm.errors import UserError

    setting = study.parse_setting("guidance=2.5,guide=weak,null=1,middle=0.4")
    assert setting["middle"] == 0.4 and setting["null"] == 1.0
    assert study.parse_setting("guidance=2")["middle"] == 1.0  # the same term at every label
    assert study.parse_setting("guidance=2")["below"] == 1.0  # eased at every noise level
    assert study.parse_setting("guidance=2,null=1,middle=0.5,below=0.85")["below"] == 0.85
    with pytest.raises(UserError, match="--setting below"):
        study.parse_setting("guidance=2,null=1,middle=0.5,below=2")
    with pytest.raises(UserError, match="--setting middle"):
        study.parse_setting("guidance=2,null=1,middle=1.5")


def test_each_setting_renders_and_records_the_schedule_the_pipeline_resolves(study, tmp_path, monkeypatch):
    """--frames-out: each setting's folder holds the frames `transitions` renders with the same values, and its
    manifest records every value of the schedule (the same keys as a `transitions` manifest)."""
    import json

    from classifier.model import ClassifierEnsemble
    from diffusion.pipeline import MitosisPipeline
    from mitosis_ldm.artifacts import read_transitions
    from test_guidance_schedule import tiny_pipeline

    size = 64
    dataset = build_dataset(tmp_path / "ds", [("a", synth_shard, {"n": 120, "size": size, "seed": 2})],
                            patch_size=size, margin=0, meta={"source": "fake"},
                            split=SplitConfig(mode="random", val=0.1, test=0.4), progress=False)
    pipeline = tiny_pipeline(tmp_path / "pipe", {"default_null_guidance": 0.0})
    monkeypatch.setattr(ClassifierEnsemble, "from_pretrained", classmethod(lambda cls, path: FakeEnsemble(size)))
    setting = "guidance=2,interval=0.2:0.9,rescale=0.5,guide=null,null=1,middle=0.5,below=0.85"
    study.main(["--pipeline", str(pipeline), "--classifier", "unused", "--dataset", str(dataset), "--seeds", "3-4",
                "--conditions", "0:1:3", "--setting", setting, "--threads", "1", "--frames-out", str(tmp_path / "fr"),
                "--out", str(tmp_path / "study.json")])

    name = "guidance2_interval0.2-0.9_rescale0.5_guidenull_null1_middle0.5_below0.85"
    folder = read_transitions(tmp_path / "fr" / name)
    manifest = folder.manifest
    assert manifest["guidance"] == 2.0 and manifest["guidance_interval"] == [0.2, 0.9]
    assert manifest["guidance_rescale"] == 0.5 and manifest["guide"] == "null" and manifest["null_guidance"] == 1.0
    assert manifest["null_guidance_middle"] == 0.5 and manifest["null_guidance_middle_below"] == 0.85
    pipe = MitosisPipeline.from_pretrained(pipeline)
    expected = pipe.transitions([3, 4], [0.0, 0.5, 1.0], 2.0, 3, "ddim", guidance_interval=(0.2, 0.9),
                                guidance_rescale=0.5, guide="null", null_guidance=1.0, null_guidance_middle=0.5,
                                null_guidance_middle_below=0.85)
    assert np.array_equal(np.asarray(folder.frames), expected)
    # the pipeline's own default (no null term) would have rendered other frames: the setting's values were used
    assert not np.array_equal(expected, pipe.transitions([3, 4], [0.0, 0.5, 1.0], 2.0, 3, "ddim",
                                                         guidance_interval=(0.2, 0.9), guidance_rescale=0.5))
    result = json.loads((tmp_path / "study.json").read_text())["settings"][setting]
    assert len(result["mean_score_by_condition"]) == 3
