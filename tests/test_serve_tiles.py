"""`serve --slides` inputs and the tile cache: folders are searched for slides whatever the suffix's case, a folder
without slides and two slides of one name are one line each, and the cache of encoded tiles stays bounded."""

from __future__ import annotations

import shutil

import pytest

from mitosis_ldm.errors import UserError
from serve_helpers import draw_slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return draw_slide(tmp_path_factory.mktemp("slides") / "slide.png")


def test_a_folder_is_searched_for_slides_whatever_the_suffixs_case(slide, tmp_path):
    from serve.tiles import SlideRegistry

    shutil.copy(slide, tmp_path / "lower.png")
    shutil.copy(slide, tmp_path / "UPPER.PNG")  # scanners and Windows shares write upper-case suffixes
    (tmp_path / "notes.txt").write_text("not a slide")
    assert SlideRegistry([str(tmp_path)]).names() == ["UPPER.PNG", "lower.png"]


def test_a_folder_without_slides_is_one_line(tmp_path):
    from serve.tiles import SlideRegistry

    (tmp_path / "notes.txt").write_text("not a slide")
    with pytest.raises(UserError, match=f"^--slides: folder {tmp_path} holds no slides "):
        SlideRegistry([str(tmp_path)])


def test_two_slides_of_one_name_are_refused(slide, tmp_path):
    from serve.tiles import SlideRegistry

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(slide, tmp_path / folder / "slide.png")
    with pytest.raises(UserError, match="two slides are named slide.png .*; slides are addressed by file name"):
        SlideRegistry([str(tmp_path / "a"), str(tmp_path / "b" / "slide.png")])


def test_the_tile_cache_keeps_the_most_recent_tiles_up_to_its_size(slide):
    from serve.tiles import SlideRegistry

    slides = SlideRegistry([str(slide)], tile_cache=2)
    first = slides.tile("slide.png", 10, 0, 0)
    for col in (1, 2):
        slides.tile("slide.png", 10, col, 0)
    assert list(slides._tiles) == [("slide.png", 10, 1, 0), ("slide.png", 10, 2, 0)]  # the oldest went
    assert slides.tile("slide.png", 10, 0, 0) == first  # read again, identical
