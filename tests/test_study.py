"""`mitosis-ldm study make` and `analyse`: the balanced draw, the blinding of the page, and every documented
bad input."""

from __future__ import annotations

import base64
import collections
import json
import re
import struct

import numpy as np
import pytest

from mitosis_ldm.artifacts import read_transitions
from patches.dataset import PatchDataset
from study import ANSWER_COLUMNS
from study.cli import main
from study.simulate import simulate, write_answers
from study.answers import read_study

from study_helpers import SIZE, make_inputs, write_nuclei

DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("study-inputs"))


def make(inputs, out, seed=0, n_real=12, n_generated=12, extra=()):
    main(["make", "--transitions", str(inputs / "tr"), "--real2gen", str(inputs / "r2g"), "--dataset",
          str(inputs / "ds"), "--n-real", str(n_real), "--n-generated", str(n_generated), "--seed", str(seed),
          "--out", str(out), *extra])
    return json.loads((out / "key.json").read_text())["items"], (out / "study.html").read_text()


@pytest.fixture(scope="module")
def study(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "study"
    key, page = make(inputs, out)
    return out, key, page


def png_chunks(data: bytes) -> list[tuple[str, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos: pos + 4])
        chunks.append((data[pos + 4: pos + 8].decode("ascii"), data[pos + 8: pos + 8 + length]))
        pos += 12 + length
    return chunks


def page_items(page: str) -> list[dict]:
    block = re.search(r'<script type="application/json" id="study-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(block)["items"]


# -- the draw ----------------------------------------------------------------

def test_draw_is_balanced_seeded_and_matches_the_sources(inputs, study, tmp_path):
    out, key, page = study
    kinds = collections.Counter(e["kind"] for e in key.values())
    assert kinds == {"real": 12, "generated": 12}
    soft = collections.Counter(round(e["soft_label"], 3) for e in key.values() if e["kind"] == "real")
    conditions = collections.Counter(e["condition"] for e in key.values() if e["kind"] == "generated")
    assert all((e["condition"] is None) == (e["kind"] == "real") != (e["soft_label"] is None) for e in key.values())
    assert len(soft) == 4 and max(soft.values()) - min(soft.values()) <= 1        # 0, 1/3, 2/3, 1: 3 each
    assert len(conditions) == 5 and max(conditions.values()) - min(conditions.values()) <= 1
    nuclei = collections.Counter((e["folder"], e["seed"]) for e in key.values() if e["kind"] == "generated")
    assert len(nuclei) == 6 and max(nuclei.values()) <= 3  # 12 frames use all 6 nuclei, none at many conditions
    ds = PatchDataset(inputs / "ds", split="test")
    test_ids = {f"ds:{pid}" for pid in ds.ids()}
    assert {e["source"] for e in key.values() if e["kind"] == "real"} <= test_ids  # held-out patches only
    # pixels in the page are exactly the source pixels
    from PIL import Image
    import io

    tr, r2g = read_transitions(inputs / "tr"), read_transitions(inputs / "r2g")
    for entry in page_items(page):
        source = key[entry["id"]]
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["src"].split(",", 1)[1]))))
        if source["kind"] == "real":
            expected = ds.uint8([ds.ids().index(source["source"].split(":", 1)[1])])[0]
        else:
            t = tr if source["folder"] == "tr" else r2g
            expected = t.frames[t.seeds.index(source["seed"]), t.conditions.index(source["condition"])]
            assert not (source["folder"] == "r2g" and source["condition"] is None)
        assert np.array_equal(pixels, expected)
    # the same seed gives the same study, another seed another draw
    again, _ = make(inputs, tmp_path / "again")
    assert again == key
    other, _ = make(inputs, tmp_path / "other", seed=1)
    assert other != key
    for kind in ("real", "generated"):  # random within each bin: another seed shows other patches, not other ids only
        assert {e["source"] for e in other.values() if e["kind"] == kind} != \
            {e["source"] for e in key.values() if e["kind"] == kind}
    study_json = json.loads((out / "study.json").read_text())
    assert study_json["items"] == sorted(key) and study_json["n_items"] == 24


def test_make_refuses_what_it_cannot_draw(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        make(inputs, tmp_path / "s", n_generated=500)
    message = capsys.readouterr().err.strip()
    assert err.value.code == 2 and message.count("\n") == 0
    assert "--n-generated" in message and "500" in message and not (tmp_path / "s").exists()
    with pytest.raises(SystemExit):
        main(["make", "--transitions", str(inputs / "ds"), "--dataset", str(inputs / "ds"), "--out",
              str(tmp_path / "s")])
    assert "--transitions" in capsys.readouterr().err and not (tmp_path / "s").exists()


def make_from(inputs, out, transitions, real2gen=(), n_generated=12, n_real=4):
    argv = ["make", "--dataset", str(inputs / "ds"), "--n-real", str(n_real), "--n-generated", str(n_generated),
            "--out", str(out)]
    for flag, folders in (("--transitions", transitions), ("--real2gen", real2gen)):
        argv += [arg for folder in folders for arg in (flag, str(folder))]
    main(argv)
    return json.loads((out / "study.json").read_text()), json.loads((out / "key.json").read_text())["items"]


def test_real2gen_input_column_stays_out_even_when_it_carries_a_label(inputs, tmp_path, capsys):
    from mitosis_ldm.artifacts import write_transitions

    r2g = read_transitions(inputs / "r2g")  # the format allows the input's own label in place of null
    write_transitions(tmp_path / "r2g", r2g.frames, {**r2g.manifest, "conditions": [0.3, 0.0, 0.5, 1.0]})
    _, key = make_from(inputs, tmp_path / "all", [inputs / "tr"], [tmp_path / "r2g"], n_generated=26)  # 20 + 6
    assert {e["condition"] for e in key.values() if e.get("folder") == "r2g"} == {0.0, 0.5, 1.0}
    with pytest.raises(SystemExit):
        make_from(inputs, tmp_path / "more", [inputs / "tr"], [tmp_path / "r2g"], n_generated=27)
    assert "only 26 are available" in capsys.readouterr().err


def test_generated_frames_of_another_size_are_refused(inputs, tmp_path, capsys):
    small = write_nuclei(tmp_path / "tr24", 300, size=SIZE - 8)
    with pytest.raises(SystemExit):
        make_from(inputs, tmp_path / "s", [small])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--dataset" in lines[0] and "would unblind" in lines[0]
    assert "ds: 32x32" in lines[0] and "tr24: 24x24" in lines[0]
    # two generated folders of different sizes: the message names each folder's size (this draw of 12 said
    # "patch size (32, 32) differs from the generated frames' (32, 32)": the last frame drawn was of the patches' size)
    with pytest.raises(SystemExit):
        make_from(inputs, tmp_path / "s", [inputs / "tr", small])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "tr24: 24x24" in lines[0] and "tr: 32x32" in lines[0] and "ds: 32x32" in lines[0]
    assert not (tmp_path / "s").exists()


def test_study_id_changes_with_the_pixels(inputs, tmp_path):
    # regenerated frames (same seeds and conditions, another model) make another study: the old answers and the
    # readers' saved progress (kept under the study id) must not carry over
    first, first_key = make_from(inputs, tmp_path / "a", [write_nuclei(tmp_path / "old" / "tr", 300)])
    second, second_key = make_from(inputs, tmp_path / "b", [write_nuclei(tmp_path / "new" / "tr", 700)])
    assert [first_key[i]["source"] for i in first["items"]] == [second_key[i]["source"] for i in second["items"]]
    assert first["study_id"] != second["study_id"]


def test_page_title_is_escaped():
    from study.page import render

    page = render(study_id="abc", title='Mitoses <2025> & "B"</title><script>alert(1)</script>', order_seed=0,
                  items=[])
    assert "<script>alert(1)" not in page and "&lt;2025&gt; &amp; &quot;B&quot;" in page


@pytest.mark.parametrize("action, flags, message", [
    ("make", ["--seed", "-1"], "--seed: must be >= 0, got -1"),
    ("simulate", ["--seed", "-1"], "--seed: must be >= 0, got -1"),
    ("simulate", ["--reader", " "], "--reader: must not be empty"),
    ("simulate", ["--strategy", "noisy", "--noise", "-0.5"], "--noise: must be >= 0, got -0.5"),
    ("simulate", ["--strategy", "noisy", "--accuracy", "1.5"], "--accuracy: must be in [0, 1], got 1.5"),
    ("simulate", ["--strategy", "noisy", "--noise", "nan"], "--noise: must be >= 0, got nan"),
    ("make", ["--n-real", "-1"], "--n-real/--n-generated: need a positive total, got -1 + 40"),
    ("analyse", ["--bootstrap", "50"], "--bootstrap: 50 resamples is too few"),
])
def test_bad_seeds_readers_and_rates_are_one_line(inputs, study, tmp_path, capsys, action, flags, message):
    # a negative seed was a numpy traceback; an empty reader wrote answers that `analyse` then refused
    out = tmp_path / ("answers.csv" if action == "simulate" else "s")
    if action == "make":
        argv = ["make", "--transitions", str(inputs / "tr"), "--dataset", str(inputs / "ds"), "--out", str(out)]
    elif action == "analyse":
        argv = ["analyse", "--study", str(study[0]), "--answers", str(tmp_path / "a.csv"), "--out", str(out)]
    else:
        argv = ["simulate", "--study", str(study[0]), "--reader", "r1", "--out", str(out)]
    with pytest.raises(SystemExit) as err:
        main([*argv, *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert not out.exists()


# -- blinding ----------------------------------------------------------------

def template(page: str) -> str:
    """The page without its data block and item count: what must not depend on the study's items."""
    page = re.sub(r'(<script type="application/json" id="study-data">).*?(</script>)', r"\1\2", page, flags=re.S)
    return re.sub(r"You will see \d+ nucleus", "You will see N nucleus", page)


def test_page_holds_nothing_that_tells_real_from_generated(inputs, study, tmp_path):
    out, key, page = study
    text = DATA_URI.sub("DATA", page)
    # no key value reaches the page: sources, folder names, field names of the key
    for entry in key.values():
        assert entry["source"] not in text
        assert not re.search(r"\b" + re.escape(entry["source"].split(":", 1)[1]) + r"\b", text)
    for word in ("soft_label", "condition", "true_degree", "source", "seed=", "key.json", '"kind"', "r2g"):
        assert word not in text, word
    # the template is the same whatever the items: another draw (other kinds per id) differs only in its data
    other_key, other_page = make(inputs, tmp_path / "other", seed=7, n_real=5, n_generated=19)
    assert template(page) == template(other_page)
    data = json.loads(re.search(r'id="study-data">(.*?)</script>', page, re.S).group(1))
    assert set(data) == {"study_id", "order_seed", "items"}
    # so "real" and "generated" occur only in the fixed UI text
    for word in ("real", "generated"):
        assert len(re.findall(word, text, re.I)) == len(re.findall(word, template(page), re.I)) > 0
    # items: only {id, src}, listed in id order (the order carries nothing)
    items = page_items(page)
    assert [it["id"] for it in items] == sorted(key) and all(set(it) == {"id", "src"} for it in items)
    assert all(re.fullmatch(r"[0-9a-f]{8}", it["id"]) for it in items)


def test_png_payloads_are_encoded_identically_with_no_metadata(study):
    out, key, page = study
    structure = collections.defaultdict(set)
    for entry in page_items(page):
        chunks = png_chunks(base64.b64decode(entry["src"].split(",", 1)[1]))
        names = [name for name, _ in chunks]
        assert names[0] == "IHDR" and names[-1] == "IEND" and set(names) == {"IHDR", "IDAT", "IEND"}, names
        kind = key[entry["id"]]["kind"]
        structure[kind].add((tuple(dict.fromkeys(names)), chunks[0][1]))  # chunk order + IHDR (size, depth, mode)
    assert structure["real"] == structure["generated"] and len(structure["real"]) == 1


# -- bad answers: one line naming the file and the field, no output --------

@pytest.fixture
def answers(study, tmp_path):
    out, _, _ = study
    rows = simulate(read_study(out), "reader-1", "noisy", seed=4)
    return out, rows, tmp_path / "answers-reader-1.csv"


def analyse_fails(study_dir, paths, tmp_path, capsys) -> str:
    with pytest.raises(SystemExit) as err:
        main(["analyse", "--study", str(study_dir), "--answers", *map(str, paths), "--bootstrap", "100",
              "--out", str(tmp_path / "results")])
    message = capsys.readouterr().err.strip()
    assert err.value.code == 2 and message.startswith("error: ") and "\n" not in message
    assert not (tmp_path / "results").exists()
    return message


def test_answers_from_another_study(answers, tmp_path, capsys):
    out, rows, path = answers
    rows[3][0] = "0123456789ab"
    write_answers(path, rows)
    message = analyse_fails(out, [path], tmp_path, capsys)
    assert str(path) in message and "row 5" in message and "'study_id'" in message and "0123456789ab" in message


def test_item_not_in_the_key(answers, tmp_path, capsys):
    out, rows, path = answers
    rows[0][2] = "deadbeef"
    write_answers(path, rows)
    message = analyse_fails(out, [path], tmp_path, capsys)
    assert str(path) in message and "'item'" in message and "deadbeef" in message and "key.json" in message


def test_duplicate_answer_by_one_reader(answers, tmp_path, capsys):
    out, rows, path = answers
    write_answers(path, rows[:5])
    second = tmp_path / "answers-again.csv"
    write_answers(second, rows[4:])  # row 4 again, in another file
    message = analyse_fails(out, [path, second], tmp_path, capsys)
    assert str(second) in message and "'item'" in message and "twice" in message and str(path) in message
    write_answers(second, rows[:3] + rows[2:3])  # and within one file
    message = analyse_fails(out, [second], tmp_path, capsys)
    assert "row 5" in message and "row 4" in message


@pytest.mark.parametrize("field, column, value", [("mitotic_rating", 4, "5"), ("mitotic_rating", 4, "-1"),
                                                  ("mitotic_rating", 4, "2.5"), ("confidence", 5, "0"),
                                                  ("real_or_generated", 3, "synthetic"), ("reader", 1, ""),
                                                  ("seconds", 6, "-1"), ("seconds", 6, "nan"), ("seconds", 6, "inf")])
def test_answer_out_of_range(answers, tmp_path, capsys, field, column, value):
    out, rows, path = answers
    rows[6][column] = value
    write_answers(path, rows)
    message = analyse_fails(out, [path], tmp_path, capsys)
    assert str(path) in message and "row 8" in message and f"'{field}'" in message
    assert (repr(value) if value else "is empty") in message


@pytest.mark.parametrize("content, expected", [
    ("", "empty"),
    ("study_id,reader,item\nx,y,z\n", "'real_or_generated'"),
    (",".join(ANSWER_COLUMNS) + "\na,b,c\n", "row 2 has 3 fields"),
    (",".join(ANSWER_COLUMNS) + '\n"unterminated,b,c,d,e,f,g,h\n', "malformed CSV"),
    (",".join(ANSWER_COLUMNS) + "\na,b,c,d,e,f,g,h,i\n", "row 2 has 9 fields"),
    ((",".join(ANSWER_COLUMNS) + "\n").encode("utf-16"), "not UTF-8 text (byte 0)"),  # saved as UTF-16 by a spreadsheet
])
def test_malformed_csv(study, tmp_path, capsys, content, expected):
    path = tmp_path / "answers-bad.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = analyse_fails(study[0], [path], tmp_path, capsys)
    assert str(path) in message and "malformed CSV" in message and expected in message


def test_ids_are_dealt_to_the_draw_in_shuffled_order(study):
    out, key, page = study
    # the draw lists the real patches first; ids handed out in draw order would put all 12 real items
    # first in the page's id order (one change of kind), so the id order would give the answer away
    kinds = [key[item]["kind"] for item in sorted(key)]
    changes = sum(a != b for a, b in zip(kinds, kinds[1:]))
    assert changes > 2, kinds


def test_label_bins_keep_up_to_eleven_distinct_values_apart():
    from study.make import label_bins

    eleven = np.linspace(0, 1, 11)  # the conditions 0:1:11: one bin each
    assert label_bins(eleven).tolist() == list(range(11))
    # twelve distinct values fall into 5 equal-width bins on [0, 1]
    assert label_bins(np.linspace(0, 1, 12)).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4]


def test_missing_or_empty_answers_file(study, tmp_path, capsys):
    missing = tmp_path / "answers-missing.csv"
    message = analyse_fails(study[0], [missing], tmp_path, capsys)
    assert str(missing) in message and "file not found" in message
    header_only = tmp_path / "answers-none.csv"  # exported before answering anything
    write_answers(header_only, [])
    message = analyse_fails(study[0], [header_only], tmp_path, capsys)
    assert str(header_only) in message and "holds no answers" in message


def test_columns_in_another_order_blank_lines_and_a_byte_order_mark_read_the_same(answers, tmp_path):
    out, rows, path = answers
    write_answers(path, rows)
    order = list(reversed(range(len(ANSWER_COLUMNS))))  # a spreadsheet may move the columns about
    moved = tmp_path / "answers-moved.csv"
    lines = [", ".join(str(r[i]) for i in order) for r in [ANSWER_COLUMNS] + rows]  # spaces after the commas
    # and save it as "CSV UTF-8", which starts the file with a byte-order mark
    moved.write_text("\n".join(lines[:4] + [""] + lines[4:]) + "\n\n", encoding="utf-8-sig")
    results = []
    for name, file in (("plain", path), ("moved", moved)):
        main(["analyse", "--study", str(out), "--answers", str(file), "--bootstrap", "100", "--out",
              str(tmp_path / name)])
        results.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert results[0]["n_answers"] == len(rows) and results[0] == results[1]


@pytest.mark.parametrize("file, field, value", [("key.json", "study_id", "0123456789ab"),
                                                ("study.json", "format", "mitosis-ldm/transitions"),
                                                ("key.json", "kind", "synthetic")])
def test_study_folder_that_does_not_hold_together(answers, tmp_path, capsys, file, field, value):
    import shutil

    out, rows, path = answers
    write_answers(path, rows)
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    data = json.loads((copy / file).read_text())
    if field == "kind":
        data["items"][sorted(data["items"])[0]]["kind"] = value
    else:
        data[field] = value
    (copy / file).write_text(json.dumps(data))
    message = analyse_fails(copy, [path], tmp_path, capsys)
    assert str(copy / file) in message and f"'{field}'" in message


@pytest.mark.parametrize("damage, field", [("not an object", "item"), ("condition 1.5", "condition"),
                                           ("soft label as text", "soft_label"), ("no source", "source")])
def test_a_key_entry_the_analysis_cannot_read_is_one_line(answers, tmp_path, capsys, damage, field):
    """The analysis reads every item's kind, label and source: an entry that was not an object, or a label that
    was not a number, failed as an AttributeError or a numpy ValueError traceback."""
    import shutil

    out, rows, path = answers
    write_answers(path, rows)
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    data = json.loads((copy / "key.json").read_text())
    items = data["items"]
    generated = next(i for i in sorted(items) if items[i]["kind"] == "generated")
    real = next(i for i in sorted(items) if items[i]["kind"] == "real")
    if damage == "not an object":
        items[real] = 0.5
    elif damage == "condition 1.5":
        items[generated]["condition"] = 1.5
    elif damage == "soft label as text":
        items[real]["soft_label"] = "high"
    else:
        del items[generated]["source"]
    (copy / "key.json").write_text(json.dumps(data))
    message = analyse_fails(copy, [path], tmp_path, capsys)
    assert str(copy / "key.json") in message and (f"'{field}'" in message or f"item '{real}'" in message), message


def test_simulate_does_not_replace_an_answers_file_without_overwrite(study, tmp_path, capsys):
    path = tmp_path / "answers-A.csv"
    path.write_text("a reader's real answers\n")
    argv = ["simulate", "--study", str(study[0]), "--reader", "sim", "--out", str(path)]
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert path.read_text() == "a reader's real answers\n"
    main([*argv, "--overwrite"])
    assert path.read_text().startswith(",".join(ANSWER_COLUMNS))
