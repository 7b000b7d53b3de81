"""Label tables of `data folder` (and the CSV cells every source reads): line numbers, splits, slides, cell text."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from patches.cli import main
from test_patches_bad_input import fails
from test_patches_labels import rows_of


@pytest.fixture
def images(tmp_path):
    """A folder of three 16-pixel patches: a.png, b.png and caseA/c.png."""
    folder = tmp_path / "images"
    (folder / "caseA").mkdir(parents=True)
    for name in ("a.png", "b.png", "caseA/c.png"):
        Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(folder / name)
    return folder


def folder_argv(tmp_path, images, text, out="ds"):
    table = tmp_path / "labels.csv"
    table.write_text(text)
    return ["folder", "--images", images, "--labels", table, "--out", tmp_path / out, "--size", "16",
            "--margin", "0"]


def test_folder_errors_name_the_csv_line_of_the_bad_row(tmp_path, capsys, images):
    """Line 1 is the header, so the second data row is line 3."""
    argv = folder_argv(tmp_path, images, "file,label\na.png,1\nabsent.png,0\n")
    fails(argv, tmp_path / "ds", capsys, "absent.png", "line 3 field 'file'")
    argv = folder_argv(tmp_path, images, "file,label\na.png,1\nb.png,0\ncaseA/c.png,1.5\n")
    fails(argv, tmp_path / "ds", capsys, "labels.csv", "line 4 field 'label'", "[0, 1]")


def test_folder_refuses_a_split_other_than_train_val_or_test(tmp_path, capsys, images):
    """A row kept with split 'training' would be in no split: PatchDataset(split="train") would drop it silently."""
    argv = folder_argv(tmp_path, images, "file,label,split\na.png,1,train\nb.png,0,training\n")
    fails(argv, tmp_path / "ds", capsys, "labels.csv", "line 3 field 'split'", "'training'")


def test_folder_rows_take_their_slide_from_the_slide_column(tmp_path, images):
    """The `slide` cell groups patches (slide-wise splits); an empty cell falls back to the sub-folder."""
    text = "id,file,label,slide\n1,a.png,1,P1\n2,b.png,0,P2\n3,caseA/c.png,1,P1\n4,caseA/c.png,0,\n"
    main([str(a) for a in folder_argv(tmp_path, images, text)])
    assert {r["id"]: r["slide"] for r in rows_of(tmp_path / "ds")} == {"1": "P1", "2": "P2", "3": "P1", "4": "caseA"}


def test_a_label_that_disagrees_with_its_votes_is_refused(tmp_path, capsys, images):
    argv = folder_argv(tmp_path, images, "file,label,votes\na.png,0.5,1;0\nb.png,1,0;0;1\n")
    fails(argv, tmp_path / "ds", capsys, "labels.csv", "line 3 field 'label'", "disagrees", "'0;0;1'")


def test_cells_are_read_without_surrounding_spaces(tmp_path, images):
    """A table written as `a.png , 1;0 , 0` (spaces after the commas): file, votes and hard label all parse."""
    main([str(a) for a in folder_argv(tmp_path, images, "file, votes, hard_label, split\n a.png , 1;0 , 0 , val \n")])
    row, = rows_of(tmp_path / "ds")
    assert (row["id"], row["file"], row["votes"], row["label"], row["hard_label"], row["split"]) == (
        "a.png", "a.png", "1;0", "0.5", "0", "val")
