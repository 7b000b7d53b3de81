"""A text file that is not UTF-8 is named with the offset of its first bad byte, counted from the file's start.

A text stream decodes in chunks of a few KiB, and its UnicodeDecodeError counts from the chunk's start: a bad byte
past the first chunk was named at the wrong offset.
"""
import json

import pytest

from mitosis_ldm.config import ConfigError, load_config
from mitosis_ldm.errors import UserError
from mitosis_ldm.io import read_json
from tests.test_config_loader import Recipe
from tests.test_posterior_report import write_posterior_folder

FAR = 20_000  # past a text stream's first chunks


def _spoil(path, far: int = FAR) -> int:
    """Put one byte that is not UTF-8 at the start of the first line after `far` bytes; returns its offset."""
    data = path.read_bytes()
    at = data.index(b"\n", far) + 1
    path.write_bytes(data[:at] + b"\xff" + data[at:])
    return at


def test_json_and_yaml_name_the_bad_byte_by_its_offset_in_the_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"pad": ["x" * 60] * 500}, indent=1))
    at = _spoil(path)
    with pytest.raises(UserError, match=rf"^{path}: malformed JSON: not UTF-8 text \(byte {at}\)$"):
        read_json(path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# a comment\n" * 3000 + "out: here\n")
    at = _spoil(recipe)
    with pytest.raises(ConfigError, match=rf"^{recipe}: malformed YAML: not UTF-8 text \(byte {at}\)$"):
        load_config(Recipe, recipe)


def test_a_posterior_table_names_the_bad_byte_by_its_offset_in_the_file(tmp_path):
    from report.posterior_section import extra

    ids = [f"p{i}" for i in range(2000)]
    folder = write_posterior_folder(tmp_path / "post", ids, ids, [0.5] * len(ids), [0.1] * len(ids))
    extra(folder)  # whole, it reads
    at = _spoil(folder / "posterior.csv")
    with pytest.raises(UserError, match=rf"posterior.csv: not UTF-8 text \(byte {at}\)$"):
        extra(folder)


def test_a_readers_answers_file_names_the_bad_byte_by_its_offset_in_the_file(tmp_path):
    from study.answers import read_answers

    path = tmp_path / "answers.csv"
    for encoding in ("utf-8", "utf-8-sig"):  # "CSV UTF-8" from a spreadsheet starts with a byte-order mark
        path.write_text("reader,item,answer\n" + "r1,1,3\n" * 4000, encoding=encoding)
        at = _spoil(path)
        with pytest.raises(UserError, match=rf"^{path}: malformed CSV: not UTF-8 text \(byte {at}\)$"):
            read_answers(path, study=None)


def test_a_patch_datasets_record_names_the_bad_byte_by_its_offset_in_the_file(tmp_path):
    from patches.dataset import read_meta
    from tests.tiny_artifacts import dataset

    root = dataset(tmp_path / "data")
    meta = root / "dataset.json"
    at = _spoil(meta, far=len(meta.read_bytes()) // 2)
    with pytest.raises(UserError, match=rf"^{meta}: malformed JSON: not UTF-8 text \(byte {at}\)$"):
        read_meta(root)
