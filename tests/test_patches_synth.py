"""The synthetic benchmark: format, labels from simulated experts, what m does to the image, determinism, inspect."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from patches.cli import main
from patches.dataset import PatchDataset
from patches.inspect import summarise
from patches.synth import Experts, draw_degree, render


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "synth"
    main(["synth", "--out", str(out), "--n", "1500", "--size", "64", "--experts", "3", "--seed", "3",
          "--workers", "2"])
    return out


def rows_of(path):
    with open(path / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_format_and_labels(synth):
    meta = json.loads((synth / "dataset.json").read_text())
    assert meta["stored_size"] == 80 and meta["patch_size"] == 64 and meta["margin"] == 8
    assert meta["true_threshold"] == 0.5 and meta["experts"]["k"] == 3
    patches = np.load(synth / "patches.npy", mmap_mode="r")
    assert patches.shape == (1500, 80, 80, 3) and patches.dtype == np.uint8
    rows = rows_of(synth)
    assert len(rows) == 1500 and len({r["id"] for r in rows}) == 1500
    for r in rows:
        votes = [int(v) for v in r["votes"].split(";")]
        assert len(votes) == 3
        assert float(r["label"]) == pytest.approx(np.mean(votes), abs=1e-5)
        assert int(r["hard_label"]) == int(np.mean(votes) >= 0.5)
        assert 0 <= float(r["true_degree"]) <= 1
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    imposters = sum(r["kind"] == "imposter" for r in rows) / len(rows)
    assert 0.1 < imposters < 0.2
    assert all(float(r["true_degree"]) <= 0.25 for r in rows if r["kind"] == "imposter")


def test_soft_labels_follow_truth_but_experts_disagree(synth):
    ds = PatchDataset(synth)
    rho = spearmanr(ds.soft_labels, ds.true_degree).statistic
    assert rho >= 0.8
    votes = np.array([[int(v) for v in r["votes"].split(";")] for r in ds.rows])
    disagree = (votes.min(1) != votes.max(1)).mean()
    assert disagree >= 0.15
    # balanced-ish: both classes well represented
    assert 0.25 < (ds.true_degree >= 0.5).mean() < 0.6


def test_degree_drives_the_image():
    """Darkness, clumping and outline all move with m (normal nuclei, nuisances random)."""
    rng = np.random.default_rng(0)
    n = 400
    m = np.linspace(0, 1, n).astype(np.float32)
    images = render(m, np.zeros(n, bool), 80, 64, rng).astype(np.float32)
    centre = images[:, 28:52, 28:52].mean(-1)  # (n, 24, 24) around the nucleus
    darkest = np.sort(centre.reshape(n, -1), axis=1)[:, :60].mean(1)  # nuclear darkness
    assert spearmanr(m, darkest).statistic < -0.6
    # m = 0 and m = 1 differ far beyond nuisance variation
    lo, hi = darkest[m < 0.15], darkest[m > 0.85]
    assert hi.mean() + 3 * hi.std() < lo.mean() + 3 * lo.std() and lo.mean() - hi.mean() > 25
    # imposters are dark too: darkness alone cannot separate them from mitoses
    imp = render(np.full(100, 0.1, np.float32), np.ones(100, bool), 80, 64, rng).astype(np.float32)
    imp_dark = np.sort(imp[:, 28:52, 28:52].mean(-1).reshape(100, -1), axis=1)[:, :60].mean(1)
    assert imp_dark.mean() < lo.mean() - 20


def test_nuisances_do_not_depend_on_degree():
    rng = np.random.default_rng(1)
    a = render(np.zeros(200, np.float32), np.zeros(200, bool), 80, 64, rng).astype(np.float32)
    corner = a[:, :12, :12].reshape(200, -1, 3).mean(1)  # background stain colour
    assert corner.std(0).mean() > 5  # stain varies between patches
    assert (a.reshape(200, -1).std(1) > 10).all()  # no blank patches


def test_determinism_and_workers(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    main(["synth", "--out", str(a), "--n", "300", "--seed", "5", "--workers", "1"])
    main(["synth", "--out", str(b), "--n", "300", "--seed", "5", "--workers", "2"])
    main(["synth", "--out", str(c), "--n", "300", "--seed", "6", "--workers", "1"])
    a_hash, b_hash, c_hash = (json.loads((p / "dataset.json").read_text())["content_hash"] for p in (a, b, c))
    assert a_hash == b_hash != c_hash


def test_ties_round_half_up():
    rng = np.random.default_rng(0)
    experts = Experts.draw(2, seed=0)
    m, imposter = draw_degree(3000, rng)
    votes = experts.vote(m, imposter, rng)
    assert ((votes.sum(1) == 1).mean()) > 0.05  # ties happen with 2 experts
    from patches.synth import synth_shard

    shard = synth_shard(0, 200, 0, 16, 0, vars(experts))
    for row in shard.rows:
        if row["votes"] in ("1;0", "0;1"):
            assert row["label"] == 0.5 and row["hard_label"] == 1


def test_other_sizes(tmp_path):
    out = tmp_path / "s32"
    main(["synth", "--out", str(out), "--n", "50", "--size", "32", "--margin", "4", "--experts", "5"])
    assert np.load(out / "patches.npy").shape == (50, 40, 40, 3)
    assert all(len(r["votes"].split(";")) == 5 for r in rows_of(out))


def test_refuses_existing_output(synth, capsys):
    before = (synth / "dataset.json").read_text()
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--out", str(synth), "--n", "10"])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (synth / "dataset.json").read_text() == before


def test_inspect(synth, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    main(["inspect", str(synth), "--out", str(sheet), "--json"])
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["count"] == 1500 and sum(summary["splits"].values()) == 1500
    assert sum(summary["label_histogram"].values()) == 1500
    assert summary["votes"]["disagree"] == pytest.approx(1 - summary["votes"]["unanimous"], abs=1e-3)
    assert summary["true_degree"]["spearman_label_vs_degree"] >= 0.8
    assert "vote" in out and "splits" in out
    from PIL import Image

    with Image.open(sheet) as img:
        width, height = img.size
    assert width > 64 * 2 * 8 and height > 64 * 2 * 3  # 12 per row, one row per label value (4 values)
    assert summarise(synth) == {k: v for k, v in summary.items()}


@pytest.mark.parametrize("damage", ["no id column", "empty id"])
def test_labels_without_ids_are_one_clean_error(synth, tmp_path, damage):
    """A labels.csv whose id column is gone or blank names the file and the field (it used to KeyError)."""
    import shutil

    from mitosis_ldm.errors import UserError

    copy = tmp_path / "ds"
    shutil.copytree(synth, copy)
    with open(copy / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in rows[0] if c != "id"] if damage == "no id column" else list(rows[0])
    if damage == "empty id":
        rows[3]["id"] = ""
    with open(copy / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(UserError, match=r"labels.csv: field 'id' is missing or empty \(data row (1|4)\)"):
        PatchDataset(copy)


def test_hard_label_probability_is_the_panels_majority_rate():
    """P(hard label = 1 | degree, imposter): a step at the threshold for noiseless experts, the normal CDF for one
    noisy expert, raised by the imposter bias, and the rate at which `vote` panels really give a majority."""
    from scipy.stats import norm

    degree = np.array([0.1, 0.45, 0.5, 0.55, 0.9])
    sharp = Experts(thresholds=[0.5] * 3, noise=[1e-9] * 3, lapse=[0.0] * 3, imposter_bias=0.0)
    away = np.array([0.1, 0.45, 0.49, 0.51, 0.9])  # noiseless: a step at the threshold
    assert sharp.hard_label_probability(away, np.zeros(5), draws=50).tolist() == [0, 0, 0, 1, 1]
    one = Experts(thresholds=[0.5], noise=[0.1], lapse=[0.0], imposter_bias=0.3)
    p = one.hard_label_probability(degree, np.zeros(5), draws=4000, seed=1)
    assert np.allclose(p, norm.cdf((degree - 0.5) / 0.1), atol=0.03)
    fooled = one.hard_label_probability(degree, np.ones(5), draws=4000, seed=1)
    assert (fooled[:2] > p[:2]).all() and fooled[1] > p[1] + 0.3  # an imposter's look pushes the votes up
    panel = Experts.draw(3, seed=0)
    rng = np.random.default_rng(7)
    imposter = np.array([0, 1, 0, 1, 0], float)
    rate = np.mean([panel.vote(degree, imposter, rng).mean(1) >= 0.5 for _ in range(4000)], axis=0)
    assert np.allclose(panel.hard_label_probability(degree, imposter, draws=4000, seed=2), rate, atol=0.03)


def test_a_lapse_flips_the_expert_s_vote():
    """Noiseless experts at threshold 0.5; the first always lapses: it calls 0.9 not mitotic and 0.1 mitotic."""
    panel = Experts(thresholds=[0.5, 0.5], noise=[1e-9, 1e-9], lapse=[1.0, 0.0], imposter_bias=0.0)
    votes = panel.vote(np.array([0.1, 0.9]), np.zeros(2), np.random.default_rng(0))
    assert votes.tolist() == [[1, 0], [0, 1]]


def test_hard_label_probability_counts_a_tied_panel_as_mitotic():
    """Two noiseless experts with thresholds 0.3 and 0.7 split 1:0 on m = 0.5: a tie, hard label 1 as in the rows."""
    panel = Experts(thresholds=[0.3, 0.7], noise=[1e-9, 1e-9], lapse=[0.0, 0.0], imposter_bias=0.0)
    p = panel.hard_label_probability(np.array([0.1, 0.5, 0.9]), np.zeros(3), draws=20)
    assert p.tolist() == [0.0, 1.0, 1.0]


def test_chunks_hold_different_patches():
    """Two chunks of one dataset draw their own degrees, votes and images (a seed shared by every chunk fails)."""
    from patches.synth import synth_jobs

    jobs = synth_jobs(20, seed=0, patch_size=16, margin=0, experts=Experts.draw(3, seed=0), chunk=10)
    (_, fn, first), (_, _, second) = jobs
    a, b = fn(**first), fn(**second)
    assert [r["id"] for r in a.rows + b.rows] == [f"synth-{i:07d}" for i in range(20)]
    assert not {r["true_degree"] for r in a.rows} & {r["true_degree"] for r in b.rows}
    assert not any(np.array_equal(x, y) for x in a.images for y in b.images)


@pytest.mark.parametrize("sigma", [0.6, 2.0])
def test_band_noise_has_unit_std_and_the_correlation_of_its_gaussian_blur(sigma):
    """White noise blurred by a Gaussian of std s correlates as exp(-d^2 / (4 s^2)) at a lag of d pixels."""
    from patches.synth import band_noise

    field = band_noise(np.random.default_rng(0), 64, 64, sigma).astype(np.float64)  # (B, S, S)
    assert field.std() == pytest.approx(1.0, abs=0.05)
    for lag in (1, 2):
        corr = (field * np.roll(field, lag, axis=2)).mean() / field.var()
        assert corr == pytest.approx(np.exp(-lag ** 2 / (4 * sigma ** 2)), abs=0.04)


def test_the_cytoplasm_clears_and_turns_granular_with_the_degree():
    """The same cells (same draws) at m = 0 and m = 1: the ring just outside the nucleus holds less eosin, and
    eosin that changes more from one pixel to the next, at m = 1."""
    from skimage.color import rgb2hed

    n = 40
    grid = np.hypot(*np.mgrid[:80, :80] - 39.5)
    ring = (grid > 14) & (grid < 18)
    eosin = {}
    for m in (0.0, 1.0):
        images = render(np.full(n, m, np.float32), np.zeros(n, bool), 80, 64, np.random.default_rng(4))
        eosin[m] = np.stack([rgb2hed(image)[..., 1] for image in images])  # (n, 80, 80)
    level = {m: e[:, ring].mean(1) for m, e in eosin.items()}
    grain = {m: np.abs(np.diff(e, axis=2))[:, ring[:, 1:]].mean(1) for m, e in eosin.items()}
    assert (level[1.0] < level[0.0]).mean() >= 0.9
    assert (grain[1.0] > grain[0.0]).mean() >= 0.75
