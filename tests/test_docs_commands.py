"""Every command line in README.md and docs/*.md names a command that exists and flags that command takes.

A renamed flag or subcommand otherwise leaves the newcomer's first copy-paste failing. Each command's `--help`
runs in this process (one import of each stage), and its flags are read from the help text.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import re
import shlex
import sys
import tomllib

import pytest

from conftest import REPO, load_bench

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PACKAGES = {pattern.rstrip("*") for pattern in  # the project's packages, as pyproject.toml installs them
            tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]}
SUBCOMMANDS = {"data", "vae", "study"}  # mitosis-ldm commands whose first argument picks a subcommand
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


INLINE = re.compile(r"`(mitosis-ldm [^`]+)`")


def doc_commands() -> list[tuple[str, int, list[str]]]:
    """(file, line, tokens) for each command in a fenced code block (continuation lines joined), and for each
    `mitosis-ldm ...` quoted in the text."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        fenced, pending, start = False, "", 0
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                fenced, pending = not fenced, ""
                continue
            if not fenced:
                found += [(path.name, number, quoted.split()) for quoted in INLINE.findall(line)]
                continue
            if not pending:
                start = number
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            text, pending = pending.strip(), ""
            try:
                tokens = shlex.split(text, comments=True)
            except ValueError:  # not shell (a table, a JSON excerpt)
                continue
            if tokens and (tokens[0] == "mitosis-ldm" or tokens[:2] == ["accelerate", "launch"]
                           or (tokens[0] in ("python", "python3") and len(tokens) > 1)):
                found.append((path.name, start, tokens))
    return found


def target(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(what runs, the argument list its --help takes) for one documented command; None: not ours."""
    if tokens[0] == "mitosis-ldm":
        words = [t for t in tokens[1:3] if not t.startswith("-") and t not in ("...", "…")]
        path = words[:2] if words and words[0] in SUBCOMMANDS else words[:1]
        return "mitosis-ldm " + " ".join(path), path
    if "-m" in tokens:
        module = tokens[tokens.index("-m") + 1]
        return (module, []) if module.split(".")[0] in PACKAGES else None  # not pip, pytest, ...
    script = tokens[1]
    if script.startswith("bench/") and script.endswith(".py"):
        return script, []
    return None


def help_text(what: str, path: list[str]) -> str:
    out = io.StringIO()
    argv = sys.argv
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            if what.startswith("mitosis-ldm"):
                from mitosis_ldm.cli import main

                main([*path, "--help"])
                raise SystemExit(1)  # no parser answered --help: the command is not known
            if what.startswith("bench/"):
                main = load_bench(what[len("bench/"):-len(".py")]).main
            else:
                main = importlib.import_module(what).main
            sys.argv = [what, "--help"]
            main(["--help"]) if inspect.signature(main).parameters else main()
    finally:
        sys.argv = argv
    assert exit_info.value.code == 0, f"{what} --help exited {exit_info.value.code}"
    return out.getvalue()


COMMANDS = doc_commands()


def test_the_docs_hold_the_commands_a_newcomer_copies():
    names = {target(tokens)[0] for _, _, tokens in COMMANDS if target(tokens)}
    # the two set-up paths and each stage: a parser that stopped finding them would pass every check below
    for expected in ("mitosis-ldm data synth", "autoencoder.train", "classifier.train", "diffusion.train",
                     "mitosis-ldm transitions", "mitosis-ldm score", "mitosis-ldm vae encode", "mitosis-ldm report"):
        assert expected in names, expected


@pytest.fixture(scope="module")
def helps():
    cache = {}

    def get(what, path):
        if what not in cache:
            cache[what] = help_text(what, path)
        return cache[what]

    return get


@pytest.mark.parametrize("where,line,tokens", COMMANDS, ids=[f"{f}:{n}" for f, n, _ in COMMANDS])
def test_a_documented_command_exists_and_takes_its_flags(where, line, tokens, helps):
    found = target(tokens)
    if found is None:
        pytest.skip("not a mitosis-ldm command")
    what, path = found
    known = set(FLAG.findall(helps(what, path))) | {"--help"}
    if what.startswith(("mitosis-ldm", "bench/")) or "-m" not in tokens:
        args = tokens[1:]
    else:
        args = tokens[tokens.index("-m") + 2:]  # the launcher's own flags come before -m
    used = {t.split("=", 1)[0] for t in args if FLAG.fullmatch(t.split("=", 1)[0])}
    assert not used - known, f"{where}:{line}: `{what}` has no {', '.join(sorted(used - known))}"


RECIPES = {"autoencoder.train": ("autoencoder.train", "AutoencoderConfig"),
           "classifier.train": ("classifier.train", "ClassifierConfig"),
           "diffusion.train": ("diffusion.train", "DiffusionTrainConfig")}


TRAINING = [c for c in COMMANDS if target(c[2]) and target(c[2])[0] in RECIPES]


@pytest.mark.parametrize("where,line,tokens", TRAINING, ids=[f"{f}:{n}" for f, n, _ in TRAINING])
def test_a_documented_recipe_override_names_a_key_the_recipe_has(where, line, tokens):
    module, name = RECIPES[target(tokens)[0]]
    defaults = getattr(importlib.import_module(module), name)()
    keys = [tokens[i + 1].split("=", 1)[0] for i, t in enumerate(tokens[:-1]) if t == "--set"]
    for key in keys:
        node = defaults
        for part in key.split("."):
            assert hasattr(node, part), f"{where}:{line}: {module} has no recipe key '{key}'"
            node = getattr(node, part)


LAUNCHES = [c for c in COMMANDS if c[2][:2] == ["accelerate", "launch"]]


def processes(tokens: list[str]) -> int:
    for i, t in enumerate(tokens[:-1]):
        if t == "--num_processes":
            return int(tokens[i + 1])
        if t.startswith("--num_processes="):
            return int(t.split("=", 1)[1])
    return 1


def test_a_documented_multi_process_launch_runs_several_processes_without_gpus():
    """`accelerate launch --num_processes 2` alone runs one process on a machine without GPUs (and
    `--cpu --num_processes 2` too); `--multi_gpu` runs two CPU processes over gloo there, and uses GPUs where
    there are some."""
    several = [(where, line, tokens) for where, line, tokens in LAUNCHES if processes(tokens) > 1]
    assert len(several) >= 3  # the parser still finds them: training, scoring, sampling
    for where, line, tokens in several:
        launcher = tokens[:tokens.index("-m")] if "-m" in tokens else tokens
        assert "--multi_gpu" in launcher and "--cpu" not in launcher, f"{where}:{line}: {' '.join(tokens)}"
