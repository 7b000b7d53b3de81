"""Reading a patch dataset: centre crops and items, the labelled-only view, the checks of a damaged folder, and the
summary `data inspect` prints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mitosis_ldm.errors import UserError
from patches.dataset import PatchDataset, Shard, SplitConfig, build_dataset


def shard(n: int, side: int) -> Shard:
    images = (np.arange(n * side * side * 3) % 253).reshape(n, side, side, 3).astype(np.uint8)
    rows = [{"id": f"p{i}", "source": "test", "slide": "s", "x": i, "y": i, "label": 0.5, "votes": "",
             "hard_label": 1} for i in range(n)]
    return Shard(images, rows)


def dataset(out, n: int = 3, size: int = 6, margin: int = 2):
    return build_dataset(out, [("s", shard, {"n": n, "side": size + 2 * margin})], patch_size=size, margin=margin,
                         meta={"source": "test"}, split=SplitConfig(mode="random"), progress=False)


def test_crops_and_items_are_the_stored_centre(tmp_path):
    root = dataset(tmp_path / "ds")
    stored = np.load(root / "patches.npy")
    data = PatchDataset(root)
    assert np.array_equal(data.uint8(), stored[:, 2:8, 2:8])
    for i in range(len(data)):
        image = data[i]["image"].numpy()  # (3, P, P) in [-1, 1]
        assert np.allclose(image, stored[i, 2:8, 2:8].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


def test_labelled_only_keeps_the_rows_with_a_soft_label(tmp_path):
    """A points row with a hard_label but no label or votes has no soft label: labelled_only leaves it out."""
    from PIL import Image

    from patches.cli import main

    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "s.png")
    (tmp_path / "cells.csv").write_text("slide,x,y,label,hard_label\ns.png,10,10,0.5,\ns.png,20,20,,1\n"
                                        "s.png,30,30,,\n")
    main(["points", "--csv", str(tmp_path / "cells.csv"), "--slides", str(tmp_path), "--out", str(tmp_path / "ds"),
          "--size", "8", "--margin", "0", "--workers", "1"])
    data = PatchDataset(tmp_path / "ds", labelled_only=True)
    assert data.ids() == ["s.png:2"] and data.soft_labels.tolist() == [0.5]


def _fewer_rows(root):
    with open(root / "labels.csv", newline="") as handle:
        lines = handle.read().splitlines(keepends=True)
    (root / "labels.csv").write_text("".join(lines[:-1]))


def _four_channels(root):
    np.save(root / "patches.npy", np.zeros((3, 10, 10, 4), np.uint8))


def _other_format(root):
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "format": "mitosis-ldm/transitions"}))


@pytest.mark.parametrize("damage, message", [
    (_fewer_rows, "labels.csv: has 2 rows but patches.npy holds 3 patches"),
    (_four_channels, "patches.npy: expected uint8 (N, S, S, 3), got uint8 (3, 10, 10, 4)"),
    (_other_format, "dataset.json: field 'format' is 'mitosis-ldm/transitions'"),
])
def test_a_damaged_folder_is_refused_naming_the_file(tmp_path, damage, message):
    root = dataset(tmp_path / "ds")
    damage(root)
    with pytest.raises(UserError) as err:
        PatchDataset(root)
    assert message in str(err.value)


def voted_shard() -> Shard:
    panels = [("1;1;0", 0.8), ("1;0", 0.3), ("0;0", 0.1), ("1;1", 0.9)]  # votes, true degree
    rows = []
    for i, (votes, degree) in enumerate(panels):
        soft = np.mean([int(v) for v in votes.split(";")])
        rows.append({"id": f"p{i}", "source": "test", "slide": "s", "x": i, "y": 0, "label": float(soft),
                     "votes": votes, "hard_label": int(soft >= 0.5), "true_degree": degree})
    return Shard(np.zeros((4, 8, 8, 3), np.uint8), rows)


def test_inspect_summarises_panels_of_two_and_three_and_the_truth(tmp_path):
    """Votes 1;1;0, 1;0, 0;0 and 1;1 with true degrees 0.8, 0.3, 0.1 and 0.9: 3 of 6 voter pairs agree, and the hard
    labels 1, 1, 0, 1 match the truth (m >= 0.5) on 3 of 4 patches."""
    from patches.inspect import summarise

    root = build_dataset(tmp_path / "ds", [("s", voted_shard, {})], patch_size=8, margin=0, meta={"source": "test"},
                         split=SplitConfig(mode="random"), progress=False)
    summary = summarise(root)
    assert summary["votes"] == {"patches_with_votes": 4, "experts_per_patch": {"2": 3, "3": 1}, "unanimous": 0.5,
                                "disagree": 0.5, "pairwise_agreement": 0.5}
    assert summary["true_degree"]["truly_mitotic"] == 2 and summary["true_degree"]["hard_label_accuracy"] == 0.75


def test_contact_sheet_rows_hold_every_label_once_with_1_in_the_last_tenth():
    from patches.inspect import label_groups

    few = np.array([0.0, 1 / 3, 1 / 3, 1.0, np.nan])
    assert [m.nonzero()[0].tolist() for m in label_groups(few)] == [[0], [1, 2], [3]]
    many = np.array([0.0, 0.05, 0.1, 0.3, 0.35, 0.6, 0.7, 0.72, 0.9, 0.95, 0.99, 1.0, np.nan])  # 12 labels: tenths
    rows = [many[m].tolist() for m in label_groups(many)]
    assert len(rows) == 10 and sum(len(r) for r in rows) == 12  # every labelled patch in exactly one row
    assert rows[3] == [0.3, 0.35] and rows[6] == [0.6] and rows[7] == [0.7, 0.72]  # 0.3, 0.6, 0.7 open theirs
    assert rows[9] == [0.9, 0.95, 0.99, 1.0]


@pytest.mark.parametrize("fields, words", [
    ({"patch_size": float("inf")}, "field 'patch_size' must be a whole number >= 1, got 'inf'"),  # was OverflowError
    ({"patch_size": 6.5}, "field 'patch_size' must be a whole number >= 1, got '6.5'"),
    ({"patch_size": True}, "field 'patch_size' must be a whole number >= 1, got 'True'"),
    ({"patch_size": 0}, "field 'patch_size' must be a whole number >= 1, got '0'"),
    ({"patch_size": None}, "field 'patch_size' must be a whole number >= 1, got missing"),
    ({"margin": -1}, "field 'margin' must be a whole number >= 0, got '-1'"),
    ({"margin": "2"}, "field 'margin' must be a whole number >= 0, got '2'"),
    ({"patch_size": 8}, "fields 'patch_size' 8 \\+ 2 x 'margin' 2 give 12px, but patches.npy holds 10x10 patches"),
])
def test_patch_size_and_margin_must_be_whole_and_match_the_stored_patches(tmp_path, fields, words):
    root = dataset(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, **fields}))
    with pytest.raises(UserError, match=f"^{root / 'dataset.json'}: {words}$"):
        PatchDataset(root)
    (root / "dataset.json").write_text(json.dumps({**meta, "patch_size": 6.0}))  # a whole float reads as the int
    assert PatchDataset(root).patch_size == 6


@pytest.mark.parametrize("field, value, words", [
    ("label", "1.5", "field 'label' of id 'p1' is outside \\[0, 1\\] \\(got '1.5'\\)"),
    ("label", "-0.1", "field 'label' of id 'p1' is outside \\[0, 1\\] \\(got '-0.1'\\)"),
    ("label", "inf", "field 'label' of id 'p1' is outside \\[0, 1\\] \\(got 'inf'\\)"),
    ("hard_label", "0.5", "field 'hard_label' of id 'p1' is neither 0 nor 1 \\(got '0.5'\\)"),
    ("hard_label", "2", "field 'hard_label' of id 'p1' is neither 0 nor 1 \\(got '2'\\)"),
    ("true_degree", "1e39", "field 'true_degree' of id 'p1' is not a finite number \\(got '1e39'\\)"),
])
def test_labels_outside_their_range_are_refused_when_the_dataset_is_read(tmp_path, field, value, words):
    """Every stage reads a dataset through PatchDataset: a label of 1.5 trained the generator on it, and 1e39 became
    infinity with a numpy warning."""
    import csv
    import warnings

    root = dataset(tmp_path / "ds")
    with open(root / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))

    def write_labels_with(text):
        rows[1][field] = text
        with open(root / "labels.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    write_labels_with(value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning before the error line
        with pytest.raises(UserError, match=f"^{root / 'labels.csv'}: {words}$"):
            PatchDataset(root)
    write_labels_with("")  # an empty field is no label, as before
    attribute = {"label": "all_soft", "hard_label": "all_hard", "true_degree": "all_degree"}[field]
    assert np.isnan(getattr(PatchDataset(root), attribute)[1])
