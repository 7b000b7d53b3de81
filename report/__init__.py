"""Results out: label consistency, morphology along transitions, fidelity, memorisation, the HTML report.

    mitosis-ldm report --transitions runs/demo/transitions --real2gen runs/demo/real2gen \
        --classifier runs/demo/classifier/model --dataset runs/demo/data/synth --out runs/demo/report

Modules: `consistency` (score vs condition per transition, bootstrap CIs),
`morphology` (nucleus segmentation and features with scikit-image), `fidelity`
(Fréchet distance and nearest-training-neighbour memorisation), `benchmark`
(synthetic ground truth: estimated degree, label-noise finder), `plots`
(matplotlib PNGs), `html` (the self-contained report page), `cli` (the command).
"""
