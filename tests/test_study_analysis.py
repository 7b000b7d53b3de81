"""A dry run of the reader-study analysis with simulated readers whose answers have known statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from study.analyse import agreement, analyse, detection, fleiss_kappa, krippendorff_ordinal
from study.answers import Answer, Study
from study.cli import main
from study.simulate import noisy_rating, simulate

from study_helpers import make_inputs

CONDITIONS = np.round(np.linspace(0, 1, 11), 2)


def synthetic_study(n_real: int = 40, n_generated: int = 40, seed: int = 0) -> Study:
    """A key without images: real items with soft labels in thirds, generated ones spread over 11 conditions."""
    rng = np.random.default_rng(seed)
    ids = [f"{k:08x}" for k in range(n_real + n_generated)]
    key = {}
    for k, item in enumerate(ids):
        if k < n_real:
            key[item] = {"kind": "real", "condition": None, "soft_label": float(rng.choice([0, 1 / 3, 2 / 3, 1])),
                         "source": f"ds:p{k}"}
        else:
            key[item] = {"kind": "generated", "condition": float(CONDITIONS[k % 11]), "soft_label": None,
                         "source": f"tr:seed={k}"}
    return Study(path=Path("synthetic"), study={"study_id": "sim", "items": ids}, key=key)


def as_answers(rows: list[list]) -> list[Answer]:
    return [Answer(r[1], r[2], r[3], int(r[4]), int(r[5]), float(r[6]), r[7], "memory", k)
            for k, r in enumerate(rows, start=2)]


def readers(study: Study, strategy: str, count: int, **kwargs) -> list[Answer]:
    return [a for k in range(count) for a in as_answers(simulate(study, f"{strategy}-{k}", strategy, seed=k, **kwargs))]


def expected_spearman(noise: float, draws: int = 200_000) -> float:
    """What rating = round(4 c + Normal(0, noise)), clipped to 0-4, implies for c uniform on the 11 conditions."""
    rng = np.random.default_rng(123)
    c = rng.choice(CONDITIONS, draws)
    return float(stats.spearmanr(noisy_rating(c, noise, rng), c).statistic)


def test_random_reader_is_at_chance_and_its_interval_covers_half():
    study = synthetic_study()
    rows = simulate(study, "coin", "random", seed=11)
    assert {r[4] for r in rows} == {0, 1, 2, 3, 4} and {r[5] for r in rows} == {1, 2, 3}  # the whole scales
    result = analyse(study, as_answers(rows), n_resamples=500)
    d = result["readers"]["coin"]["detection"]
    assert d["ci"][0] <= 0.5 <= d["ci"][1] and d["p_value"] > 0.05 and abs(d["auc"] - 0.5) < 0.15
    # the exact interval's coverage over many random readers is at least nominal
    rng = np.random.default_rng(5)
    is_generated = np.array([study.key[i]["kind"] == "generated" for i in study.study["items"]])
    covered = []
    for _ in range(100):
        d = detection(rng.random(80) < 0.5, is_generated, rng.integers(1, 4, 80).astype(float))
        covered.append(d["ci"][0] <= 0.5 <= d["ci"][1])
    assert np.mean(covered) >= 0.9
    # random readers do not agree with each other
    pooled = analyse(study, readers(study, "random", 4), n_resamples=200)
    assert abs(pooled["agreement"]["krippendorff_alpha_ordinal_rating"]) < 0.15
    assert abs(pooled["agreement"]["fleiss_kappa_real_vs_generated"]) < 0.15


def test_reader_who_always_detects():
    study = synthetic_study()
    result = analyse(study, readers(study, "oracle", 2), n_resamples=500)
    for name in ("oracle-0", "oracle-1"):
        d = result["readers"][name]["detection"]
        assert d["accuracy"] == 1.0 and d["correct"] == 80 and d["generated_called_real"] == 0.0 and d["auc"] == 1.0
        assert d["ci"][0] == pytest.approx(0.025 ** (1 / 80)) and d["p_value"] < 1e-20  # Clopper-Pearson at k = n
    assert result["pooled"]["detection"]["accuracy"] == 1.0
    assert result["agreement"]["fleiss_kappa_real_vs_generated"] == pytest.approx(1.0)
    assert result["agreement"]["krippendorff_alpha_ordinal_rating"] == pytest.approx(1.0)


@pytest.mark.parametrize("noise", [0.5, 1.5])
def test_rating_follows_the_condition_as_the_noise_implies(noise):
    study = synthetic_study(n_real=20, n_generated=60)
    result = analyse(study, readers(study, "noisy", 8, noise=noise, accuracy=0.7), n_resamples=1000)
    expected = expected_spearman(noise)
    pooled = result["pooled"]["rating"]["generated_vs_condition"]
    assert pooled["n"] == 480
    assert pooled["ci"][0] <= expected <= pooled["ci"][1]
    assert abs(pooled["value"] - expected) < 0.06
    accuracy = result["pooled"]["detection"]
    assert accuracy["ci"][0] <= 0.7 <= accuracy["ci"][1]


def test_noise_levels_order_the_spearman():
    assert 1.0 > expected_spearman(0.0) > expected_spearman(0.5) > expected_spearman(1.5) > expected_spearman(4.0) > 0


def test_fleiss_kappa_and_krippendorff_on_known_tables():
    # the worked example on Wikipedia's "Fleiss' kappa" page: 10 subjects, 14 raters, 5 categories, kappa 0.210
    table = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                      [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)
    assert fleiss_kappa(np.array([[2, 0], [2, 0]])) is None  # one category only: undefined
    same = np.array([[0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4, 4]], float)
    assert krippendorff_ordinal(same) == pytest.approx(1.0)
    assert krippendorff_ordinal(same[:1]) is None  # one reader: no agreement to measure


def test_agreement_counts_only_the_items_every_reader_answered():
    study = synthetic_study(n_real=4, n_generated=4)
    items = study.study["items"]  # four real items, then four generated ones

    def answer(reader, item, called):
        return Answer(reader, item, called, 2, 2, 1.0, "", "memory", 0)

    first = [answer("r1", item, study.key[item]["kind"]) for item in items]  # all eight, each right
    second = [answer("r2", item, called) for item, called in
              zip(items[:6], ["real", "real", "real", "generated", "generated", "real"])]  # the first six only
    result = agreement(first + second, study)
    assert result["n_readers"] == 2 and result["items_answered_by_every_reader"] == 6
    # on those six: four unanimous, two split, 8 of 12 calls real: P = 4/6, P_e = 5/9, kappa = (1/9) / (4/9)
    assert result["fleiss_kappa_real_vs_generated"] == pytest.approx(0.25)


def test_simulate_then_analyse_through_the_command(tmp_path, capsys):
    root = make_inputs(tmp_path / "inputs")
    main(["make", "--transitions", str(root / "tr"), "--dataset", str(root / "ds"), "--n-real", "10",
          "--n-generated", "10", "--out", str(tmp_path / "study")])
    files = []
    for reader, strategy in (("sim-a", "oracle"), ("sim-b", "random")):
        files.append(tmp_path / f"answers-{reader}.csv")
        main(["simulate", "--study", str(tmp_path / "study"), "--reader", reader, "--strategy", strategy,
              "--out", str(files[-1])])
    main(["analyse", "--study", str(tmp_path / "study"), "--answers", *map(str, files), "--bootstrap", "200",
          "--out", str(tmp_path / "results")])
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["readers"]["sim-a"]["detection"]["accuracy"] == 1.0
    assert "sim-a" in printed and "Krippendorff" in printed
    page = (tmp_path / "results" / "results.html").read_text()
    assert "data:image/png;base64," in page and "Fleiss" in page and "sim-b" in page
    assert results["agreement"]["items_answered_by_every_reader"] == 20
    assert results["n_items"] == 20 and results["n_answers"] == 40 and "20 items, 2 reader(s), 40 answers" in page
    assert results["bootstrap_resamples"] == 200  # --bootstrap reaches the analysis
    # the rating against the experts' true degree pairs each real item's rating with that item's degree
    key = json.loads((tmp_path / "study" / "key.json").read_text())["items"]
    rows = [line.split(",") for line in files[0].read_text().splitlines()[1:]]
    real = [(int(r[4]), key[r[2]]["true_degree"]) for r in rows if key[r[2]]["kind"] == "real"]
    expected = stats.spearmanr(*zip(*real)).statistic
    assert results["readers"]["sim-a"]["rating"]["real_vs_true_degree"]["value"] == pytest.approx(expected)
    curves = results["curves"]
    assert [p["x"] for p in curves["generated"]] == sorted({p["x"] for p in curves["generated"]})
    assert sum(p["n"] for p in curves["generated"]) == 20 and sum(p["n"] for p in curves["real"]) == 20
    with pytest.raises(SystemExit):  # an existing results folder is not replaced without --overwrite
        main(["analyse", "--study", str(tmp_path / "study"), "--answers", str(files[0]), "--out",
              str(tmp_path / "results")])


def test_report_section_reads_the_analysis(tmp_path, capsys):
    from report.cli import parser as report_parser
    from report.extras import HeldOut
    from report.study_section import extra

    root = make_inputs(tmp_path / "inputs")
    main(["make", "--transitions", str(root / "tr"), "--dataset", str(root / "ds"), "--n-real", "10",
          "--n-generated", "10", "--out", str(tmp_path / "study")])
    main(["simulate", "--study", str(tmp_path / "study"), "--reader", "sim", "--strategy", "oracle",
          "--out", str(tmp_path / "answers-sim.csv")])
    main(["analyse", "--study", str(tmp_path / "study"), "--answers", str(tmp_path / "answers-sim.csv"),
          "--bootstrap", "200", "--out", str(tmp_path / "results")])
    key = json.loads((tmp_path / "study" / "key.json").read_text())["items"]
    real = {e["source"].split(":", 1)[1]: e["soft_label"] for e in key.values() if e["kind"] == "real"}
    ids = sorted(real)
    held_out = HeldOut(classifier=None, dataset_root=root / "ds", split="test", ids=ids, images=np.zeros((0,)),
                       soft_labels=np.array([real[i] for i in ids]), hard_labels=np.zeros(len(ids)),
                       true_degree=np.zeros(len(ids)), scores=np.array([real[i] for i in ids]),
                       score_stds=np.zeros(len(ids)), config=None, log=lambda *_: None)
    result = extra(tmp_path / "results")(held_out)
    assert result.key == "study" and result.metrics["pooled"]["detection"]["accuracy"] == 1.0
    # the oracle rates round(4 x soft label) and the stand-in classifier scores the soft label: rank-identical
    assert result.metrics["readers_vs_classifier"] == {"n": 10, "spearman": pytest.approx(1.0)}
    (tmp_path / "report").mkdir()
    html = result.write(tmp_path / "report")
    assert "Krippendorff" in html and "data:image/png;base64," in html and "readers' mean rating" in html
    assert (tmp_path / "report" / "study-rating_vs_label.png").exists()
    assert report_parser().parse_args(["--transitions", "t", "--classifier", "c", "--dataset", "d", "--out", "o",
                                       "--study", "s"]).study == ["s"]
    with pytest.raises(SystemExit):  # a study folder is not an analysis folder: one line naming the field
        from mitosis_ldm.errors import user_errors

        user_errors(extra)(tmp_path / "study")
    assert "results.json" in capsys.readouterr().err
    # a damaged analysis is refused when read, naming the field, before the report's own work
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    results["readers"]["sim"]["detection"]["ci"] = [0.5]
    (tmp_path / "results" / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit):
        user_errors(extra)(tmp_path / "results")
    assert capsys.readouterr().err == (f"error: {tmp_path / 'results' / 'results.json'}: field "
                                       f"'readers.sim.detection.ci' is [0.5], expected a list of 2\n")


def test_summary_of_a_hand_made_reader_matches_counts_done_by_hand():
    study = synthetic_study(n_real=4, n_generated=4)
    items = study.study["items"]  # four real items, then generated ones at conditions 0.4, 0.5, 0.6, 0.7
    calls = ["real", "real", "real", "generated", "generated", "generated", "real", "real"]
    ratings = [0, 0, 1, 4, 1, 2, 3, 4]
    confidences = [3, 3, 1, 2, 3, 1, 2, 1]
    seconds = [1, 1, 1, 1, 1, 1, 1, 9]
    answers = [Answer("r", item, c, r, k, s, "", "memory", 0)
               for item, c, r, k, s in zip(items, calls, ratings, confidences, seconds)]
    result = analyse(study, answers, n_resamples=200)
    s = result["readers"]["r"]
    d = s["detection"]
    assert d["correct"] == 5 and d["accuracy"] == 5 / 8
    assert d["generated_called_real"] == 0.5  # two of four generated called real (one of four real called generated)
    # confidence-weighted scores: generated +3 +1 -2 -1, real -3 -3 -1 +2; P(generated > real) + ties / 2 = 11.5 / 16
    # (the unweighted +-1 answer would give 10 / 16)
    assert d["auc"] == pytest.approx(11.5 / 16)
    assert d["p_value"] == pytest.approx(stats.binomtest(5, 8, 0.5).pvalue)
    assert s["mean_rating"] == {"generated": 2.5, "real": 1.25}
    assert s["seconds"] == {"median": 1.0, "mean": 2.0, "total": 16.0}
    assert [p["x"] for p in result["curves"]["generated"]] == pytest.approx([0.4, 0.5, 0.6, 0.7])
    assert [p["mean"] for p in result["curves"]["generated"]] == [1.0, 2.0, 3.0, 4.0]
    per_item = result["items"]
    assert [per_item[item]["called_generated"] for item in items] == [0, 0, 0, 1, 1, 1, 0, 0]
    assert [per_item[item]["mean_rating"] for item in items] == ratings


def test_krippendorff_alpha_is_the_ordinal_one():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", 4 observers x 12 units: nominal 0.743,
    # ordinal 0.815, interval 0.849
    n = np.nan
    data = np.array([[1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
                     [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]])
    assert krippendorff_ordinal(data) == pytest.approx(0.815, abs=5e-4)


def test_results_page_states_the_verdict_and_each_interval_in_its_column():
    from study.results import SUMMARY_HEADER, _p, section_html, summary_rows

    study = synthetic_study()
    chance = analyse(study, as_answers(simulate(study, "coin", "random", seed=11)), n_resamples=200)
    assert chance["pooled"]["detection"]["ci"][1] > 0.5  # the upper bound is above chance, the lower one is not
    assert "readers did not tell generated from real better than chance" in section_html(chance, "data:,")
    oracle = analyse(study, readers(study, "oracle", 1), n_resamples=200)
    assert "readers told generated from real better than chance" in section_html(oracle, "data:,")
    noisy = analyse(study, readers(study, "noisy", 1, noise=1.5, accuracy=0.7), n_resamples=200)
    row = dict(zip(SUMMARY_HEADER, summary_rows(noisy)[1]))
    s = noisy["readers"]["noisy-0"]
    d, gen, real = s["detection"], s["rating"]["generated_vs_condition"], s["rating"]["real_vs_soft_label"]
    assert row["accuracy [95% CI]"] == f"{d['accuracy']:.2f} [{d['ci'][0]:.2f}, {d['ci'][1]:.2f}]"
    for column, entry in (("Spearman rating~condition (generated)", gen), ("Spearman rating~soft label (real)", real)):
        assert row[column] == f"{entry['value']:.2f} [{entry['ci'][0]:.2f}, {entry['ci'][1]:.2f}]"
    assert gen["value"] != real["value"]
    assert _p(0.0004) == "< 0.001" and _p(0.005) == "0.005" and _p(None) == "–"


def test_rating_against_true_degree_only_when_every_real_item_has_one():
    study = synthetic_study(n_real=5, n_generated=2)
    answers = [Answer("r", item, "real", min(k, 4), 2, 1.0, "", "memory", 0)
               for k, item in enumerate(study.study["items"])]
    for k, item in enumerate(study.study["items"][:5]):
        study.key[item]["true_degree"] = k / 4  # the rating follows it exactly
    rating = analyse(study, answers, n_resamples=100)["pooled"]["rating"]
    assert rating["real_vs_true_degree"]["value"] == pytest.approx(1.0)
    del study.key[study.study["items"][0]]["true_degree"]  # a patch whose degree the dataset does not know
    assert "real_vs_true_degree" not in analyse(study, answers, n_resamples=100)["pooled"]["rating"]
