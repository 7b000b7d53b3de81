"""The project's Python stays pycodestyle-clean at 120 columns (one layout for every module, no sideways scrolling)
and pyflakes-clean (no unused imports or variables, no undefined names)."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import pycodestyle
from pyflakes.api import checkPath
from pyflakes.reporter import Reporter

REPO = Path(__file__).resolve().parents[1]
MAX_LINE = 120


def python_files() -> list[Path]:
    """Every .py file of the project's packages, its benches and its tests."""
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    folders = [REPO / name.rstrip("*") for name in packages] + [REPO / "bench", REPO / "tests"]
    return sorted(p for folder in folders for p in folder.rglob("*.py") if "node_modules" not in p.parts)


def test_every_python_file_is_pycodestyle_clean(capsys):
    files = python_files()
    assert len(files) > 100 and REPO / "diffusion" / "pipeline.py" in files
    report = pycodestyle.StyleGuide(max_line_length=MAX_LINE).check_files([str(p) for p in files])
    assert report.total_errors == 0, capsys.readouterr().out


def test_a_long_line_is_reported(tmp_path, capsys):
    bad = tmp_path / "wide.py"
    bad.write_text("x = '" + "a" * MAX_LINE + "'\n")
    report = pycodestyle.StyleGuide(max_line_length=MAX_LINE).check_files([str(bad)])
    assert report.total_errors == 1 and "E501" in capsys.readouterr().out


def pyflakes_warnings(paths) -> tuple[int, str]:
    out = io.StringIO()
    reporter = Reporter(out, out)
    return sum(checkPath(str(p), reporter) for p in paths), out.getvalue()


def test_every_python_file_is_pyflakes_clean():
    count, text = pyflakes_warnings(python_files())
    assert count == 0, text


def test_an_unused_import_and_variable_are_reported(tmp_path):
    bad = tmp_path / "unused.py"
    bad.write_text("import sys\n\n\ndef f():\n    x = 1\n")
    count, text = pyflakes_warnings([bad])
    assert count == 2 and "'sys' imported but unused" in text and "'x' is assigned to but never used" in text
