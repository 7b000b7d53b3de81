"""`mitosis-ldm study make|analyse|simulate`: a blinded reader study, from drawing the set to the statistics.

    mitosis-ldm study make --transitions runs/demo/transitions --real2gen runs/demo/real2gen \\
        --dataset runs/demo/data/synth --n-real 40 --n-generated 40 --seed 0 --out runs/study/demo
    # readers open runs/study/demo/study.html, answer, press Export -> answers-READER.csv
    mitosis-ldm study analyse --study runs/study/demo --answers answers-A.csv answers-B.csv --out runs/study/results
    mitosis-ldm study simulate --study runs/study/demo --reader sim --strategy noisy --out answers-sim.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mitosis_ldm.errors import UserError, check_seed, user_errors
from mitosis_ldm.io import atomic_dir, check_new_output


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mitosis-ldm study", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True, metavar="make|analyse|simulate")
    make = sub.add_parser("make", help="draw a balanced blinded set; write study.html, key.json, study.json")
    make.add_argument("--transitions", action="append", required=True, metavar="DIR",
                      help="transitions folder (repeatable): generated frames")
    make.add_argument("--real2gen", action="append", default=[], metavar="DIR",
                      help="real2gen folder (repeatable): its generated columns join the generated pool")
    make.add_argument("--dataset", required=True, metavar="DIR", help="patch dataset: held-out (test) real patches")
    make.add_argument("--n-real", type=int, default=40, help="real patches, spread over soft-label bins (40)")
    make.add_argument("--n-generated", type=int, default=40, help="generated frames, spread over conditions (40)")
    make.add_argument("--seed", type=int, default=0, help="draws the set, the item ids and every reader's order")
    make.add_argument("--title", default="Mitotic figure reader study", help="page title")
    make.add_argument("--out", required=True, type=Path, metavar="DIR", help="study folder to write")
    make.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    analyse = sub.add_parser("analyse", help="statistics of the readers' answers: results.json, results.html")
    analyse.add_argument("--study", required=True, type=Path, metavar="DIR", help="the folder `study make` wrote")
    analyse.add_argument("--answers", nargs="+", required=True, metavar="CSV", help="answers-READER.csv files")
    analyse.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs (2000)")
    analyse.add_argument("--out", required=True, type=Path, metavar="DIR", help="results folder to write")
    analyse.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    sim = sub.add_parser("simulate", help="a simulated reader's answers file (dry run of the analysis)")
    sim.add_argument("--study", required=True, type=Path, metavar="DIR")
    sim.add_argument("--reader", required=True, help="reader id written into the file")
    sim.add_argument("--strategy", choices=("random", "oracle", "noisy"), default="random")
    sim.add_argument("--noise", type=float, default=0.5, help="noisy: rating noise std in rating units (0.5)")
    sim.add_argument("--accuracy", type=float, default=0.75, help="noisy: chance of a right real/generated call")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", required=True, type=Path, metavar="CSV")
    sim.add_argument("--overwrite", action="store_true")
    return p


def run_make(args) -> None:
    from .make import make_study

    check_seed(args.seed)
    check_new_output(args.out, args.overwrite)
    study = make_study(args.transitions, args.real2gen, args.dataset, args.n_real, args.n_generated, args.seed,
                       args.out, args.overwrite, title=args.title)
    print(f"study {study['study_id']}: {study['n_real']} real + {study['n_generated']} generated items")
    print(f"page: {(args.out / 'study.html').resolve()}  (key: {args.out / 'key.json'}; keep it from the readers)")


def run_analyse(args) -> None:
    from .analyse import analyse
    from .answers import read_all_answers, read_study
    from .results import write_results

    check_new_output(args.out, args.overwrite)
    if args.bootstrap < 100:
        raise UserError(f"--bootstrap: {args.bootstrap} resamples is too few for a 95% interval (use >= 100)")
    study = read_study(args.study)
    answers = read_all_answers(args.answers, study)  # every file is checked before anything is written
    results = analyse(study, answers, n_resamples=args.bootstrap)
    with atomic_dir(args.out, args.overwrite) as tmp:
        write_results(tmp, results, study.study.get("title", "Reader study"))
    for name, s in [("pooled", results["pooled"])] + sorted(results["readers"].items()):
        d, r = s["detection"], s["rating"]
        gen, real = r["generated_vs_condition"], r["real_vs_soft_label"]
        print(f"{name:<12} n={s['n_answers']:<4} accuracy {d['accuracy']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}] "
              f"p={d['p_value']:.3g}  generated called real {_num(d['generated_called_real'])}  "
              f"AUC {_num(d['auc'])}  Spearman generated {_num(gen['value'])} {_span(gen)}  "
              f"real {_num(real['value'])} {_span(real)}")
    a = results["agreement"]
    print(f"agreement: Krippendorff alpha (ordinal) {_num(a['krippendorff_alpha_ordinal_rating'])}, "
          f"Fleiss kappa {_num(a['fleiss_kappa_real_vs_generated'])} over {a['items_answered_by_every_reader']} items")
    print(f"results: {(args.out / 'results.html').resolve()}")


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _span(entry: dict) -> str:
    lo, hi = entry["ci"]
    return "" if lo is None else f"[{lo:.3f}, {hi:.3f}]"


def run_simulate(args) -> None:
    from .answers import read_study
    from .simulate import simulate, write_answers

    check_seed(args.seed)
    if not args.reader.strip():
        raise UserError("--reader: must not be empty (`study analyse` refuses answers without a reader)")
    if not args.noise >= 0:
        raise UserError(f"--noise: must be >= 0, got {args.noise:g}")
    if not 0 <= args.accuracy <= 1:
        raise UserError(f"--accuracy: must be in [0, 1], got {args.accuracy:g}")
    check_new_output(args.out, args.overwrite)
    study = read_study(args.study)
    rows = simulate(study, args.reader, args.strategy, args.seed, args.noise, args.accuracy)
    write_answers(args.out, rows)
    print(f"{args.out}: {len(rows)} answers by simulated reader '{args.reader}' ({args.strategy})")


@user_errors
def main(argv=None):
    args = parser().parse_args(argv)
    {"make": run_make, "analyse": run_analyse, "simulate": run_simulate}[args.action](args)
    return 0


if __name__ == "__main__":
    main()
