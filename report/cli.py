"""`mitosis-ldm report`: label consistency, morphology, fidelity, memorisation and the HTML report.

    mitosis-ldm report --transitions runs/demo/transitions [--real2gen runs/demo/real2gen] \\
        --classifier runs/demo/classifier/model --dataset runs/demo/data/synth --out runs/demo/report \\
        [--config configs/demo/report.yaml] [--set bootstrap=2000] [--overwrite]

Writes OUT/metrics.json, CSVs, PNG plots and a self-contained OUT/report.html
(atomically), and each input folder's own metrics.json.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from mitosis_ldm.artifacts import CLASSIFIER, PATCHES, expect_artifact
from mitosis_ldm.config import load_config
from mitosis_ldm.errors import UserError, user_errors
from mitosis_ldm.io import check_new_output
from mitosis_ldm.launch import process_state

from .build import ReportConfig, build_report


# extra judges: --FLAG DIR -> module whose `extra(path)` returns `make(held_out) -> Extra` (see extras.py)
EXTRAS: dict[str, tuple[str, str]] = {
    "posterior": ("report.posterior_section", "a `mitosis-ldm posterior` folder: the diffusion model's label "
                  "posterior beside the ensemble (held-out labelled patches, or unlabelled nuclei)"),
    "cas": ("report.cas_section", "a bench/cas.py result (cas.json): CAS table, AUROC vs fraction of real labels"),
    "study": ("report.study_section", "a `study analyse` folder: readers' detection, rating vs label, agreement"),
}


def load_classifier(path):
    """The classifier ensemble of a classifier (or classifier run) folder."""
    path = expect_artifact(path, CLASSIFIER, "--classifier")
    try:
        from classifier.model import ClassifierEnsemble
    except ImportError as err:
        raise UserError(f"{path}: cannot load the classifier: the classifier package is unavailable ({err})") from None
    return path, ClassifierEnsemble.from_pretrained(path).to(process_state().device)  # a GPU where there is one


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mitosis-ldm report", description=__doc__.split("\n")[0])
    p.add_argument("--transitions", action="append", required=True, metavar="DIR",
                   help="a transitions folder (repeatable); the first one is held against the targets")
    p.add_argument("--real2gen", action="append", default=[], metavar="DIR", help="a real2gen folder (repeatable)")
    p.add_argument("--classifier", required=True, metavar="DIR", help="classifier folder (or its run folder)")
    p.add_argument("--dataset", required=True, metavar="DIR", help="patch dataset: real patches to compare with")
    for flag, (_, help_) in EXTRAS.items():
        p.add_argument(f"--{flag}", action="append", default=[], metavar="DIR", help=help_)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="report folder to write")
    p.add_argument("--config", help="YAML overriding the ReportConfig defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and inputs' metrics.json)")
    p.add_argument("--quiet", action="store_true", help="print only the report's path")
    return p


@user_errors
def main(argv=None):
    args = parser().parse_args(argv)
    check_new_output(args.out, args.overwrite)  # fail before any work
    cfg = load_config(ReportConfig, args.config, args.set)
    dataset = expect_artifact(args.dataset, PATCHES, "--dataset")
    classifier_path, classifier = load_classifier(args.classifier)
    log = (lambda *_: None) if args.quiet else print
    # every extra folder is read (and checked) before the report's own work starts
    extras = [importlib.import_module(module).extra(path)
              for flag, (module, _) in EXTRAS.items() for path in getattr(args, flag.replace("-", "_"))]
    metrics = build_report(cfg, args.transitions, args.real2gen, classifier, classifier_path, dataset, args.out,
                           args.overwrite, log=log, extras=extras)
    for name, t in metrics["targets"].items():
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lo, hi = t.get("ci") or (None, None)
        interval = f"  95% CI {lo:.3f}-{hi:.3f}" if lo is not None and hi is not None else ""
        log(f"  {name:<24} {value:>8}  (target {t['target']}) {verdict}{interval}")
    reference = metrics["fidelity"].get("reference")
    if reference and reference["worst_bin"] is not None:
        bins = ", ".join("n/a" if r["reference_ratio"] is None else f"{r['reference_ratio']:.2f}"
                         for r in metrics["fidelity"]["bins"])
        log(f"  calibrated real reference: worst bin {reference['worst_bin']:.3f} (bins {bins}): what training "
            "patches drawn as a gradual, calibrated transition score")
    print(f"report: {(args.out / 'report.html').resolve()}")
    return 0


if __name__ == "__main__":
    main()
