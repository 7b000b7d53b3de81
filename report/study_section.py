"""The report's reader-study section: what pathologists said (reads `mitosis-ldm study analyse`'s folder).

    mitosis-ldm report ... --study runs/study/results

Shows the readers' detection of generated patches, their rating against the
label, their agreement and the rating plot, as `study analyse` computed them;
where the study's real items are the report's held-out patches, it adds how the
readers' mean rating follows the classifier ensemble's score on the same patches.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from mitosis_ldm.errors import UserError
from mitosis_ldm.io import read_json
from mitosis_ldm.shapes import check_shape

from .extras import Extra, HeldOut
from .html import esc, file_data_uri
from .stats import spearman

PLOT = "rating_vs_label.png"


def read_results(path) -> tuple[Path, dict]:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    data = read_json(folder / "results.json", "study results")
    for field in ("study_id", "pooled", "readers", "agreement", "curves", "items"):
        if not isinstance(data, dict) or field not in data:
            raise UserError(f"{folder / 'results.json'}: field '{field}' is missing "
                            f"(--study expects the folder `mitosis-ldm study analyse` wrote)")
    from study.results import RESULTS_SHAPE

    check_shape(data, RESULTS_SHAPE, folder / "results.json")
    if not (folder / PLOT).exists():
        raise UserError(f"{folder / PLOT}: missing (--study expects the folder `mitosis-ldm study analyse` wrote)")
    return folder, data


def readers_vs_classifier(data: dict, held_out: HeldOut) -> dict | None:
    """Spearman of the readers' mean rating with the ensemble score, on the real items the report also scored."""
    prefix = held_out.dataset_root.name + ":"
    position = {pid: k for k, pid in enumerate(held_out.ids)}
    pairs = [(entry["mean_rating"], float(held_out.scores[position[entry["source"][len(prefix):]]]))
             for entry in data["items"].values()
             if entry["kind"] == "real" and entry["source"].startswith(prefix)
             and entry["source"][len(prefix):] in position]
    if len(pairs) < 3:
        return None
    rating, score = np.array(pairs).T
    return {"n": len(pairs), "spearman": spearman(rating, score)}


def extra(path):
    """`--study DIR`: read (and check) the analysis now; the section is made when the report is built."""
    folder, data = read_results(path)

    def make(held_out: HeldOut) -> Extra:
        versus = readers_vs_classifier(data, held_out)
        metrics = {"study_id": data["study_id"], "pooled": data["pooled"], "agreement": data["agreement"],
                   "readers": sorted(data["readers"]), "readers_vs_classifier": versus}
        return Extra(key="study", title="Reader study: pathologists' judgement",
                     metrics=metrics, write=lambda tmp: section(tmp, folder, data, versus))

    return make


def section(tmp: Path, folder: Path, data: dict, versus: dict | None) -> str:
    from study.results import section_html

    shutil.copyfile(folder / PLOT, tmp / f"study-{PLOT}")
    body = section_html(data, file_data_uri(tmp / f"study-{PLOT}"))
    if versus is not None:
        body += (f'<p class="note">On the {versus["n"]} real study patches that are also the report\'s held-out '
                 f'patches, Spearman of the readers\' mean rating with the classifier ensemble\'s score: '
                 f'<b>{versus["spearman"]:.3f}</b>.</p>')
    return f'<p class="note">From <code>{esc(folder)}</code>.</p>' + body
