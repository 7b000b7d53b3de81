"""`mitosis-ldm` command dispatcher.

Maps each subcommand to a module and imports it only when that subcommand runs,
so `mitosis-ldm --help` is instant and the spine imports no stage. Every target
module exposes `main(argv=None)`.
"""

from __future__ import annotations

import importlib
import sys

from .errors import exit_stopped, raise_if_stopped, stop_on_signals

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("patches.cli",
             "make and inspect patch datasets "
             "(synth, midog, sliderunner, points, folder, annotators, detect, inspect)"),
    "vae": ("autoencoder.cli", "the autoencoder as a tool: encode, decode, reconstruct, evaluate"),
    "score": ("classifier.score", "score images, folders, patch datasets or transitions with the classifier ensemble"),
    "evaluate": ("classifier.evaluate", "evaluate the classifier against hard and soft labels"),
    "cache": ("diffusion.cache", "encode a patch dataset into a latent cache"),
    "transitions": ("diffusion.sample", "render the same nucleus at conditions y = 0 ... 1"),
    "real2gen": ("diffusion.real2gen", "render a real patch at target labels (SDEdit or DDIM inversion)"),
    "generate": ("diffusion.generate", "generate a labelled patch dataset (training data for downstream classifiers)"),
    "guide": ("diffusion.guide", "attach a weaker model of the same latents to a pipeline, for autoguidance"),
    "posterior": ("diffusion.posterior",
                  "the diffusion model's posterior over the label of real patches (a second judge)"),
    "report": ("report.cli", "label consistency, morphology, fidelity and the HTML report"),
    "study": ("study.cli", "a blinded reader study: make the page, simulate readers, analyse the answers"),
    "serve": ("serve.cli", "local slide explorer: click a nucleus, watch it turn mitotic (FastAPI + OpenSeadragon)"),
    "check": ("mitosis_ldm.check", "verify artifact folders: recorded hashes, shapes, labels, every part loads"),
    "demo": ("mitosis_ldm.demo", "run the whole pipeline on the embedded default"),
}

TRAINING = """training (one stage at a time, multi-process with accelerate):
  accelerate launch -m autoencoder.train --config configs/demo/autoencoder.yaml
  accelerate launch -m classifier.train  --config configs/demo/classifier.yaml
  accelerate launch -m diffusion.train   --config configs/demo/diffusion.yaml"""


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: mitosis-ldm COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", TRAINING, "", "Run `mitosis-ldm COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    restore = stop_on_signals()  # a stop while torch is imported waits for the import to end: see there
    try:
        try:
            module = importlib.import_module(COMMANDS[name][0])  # torch and friends: seconds, before any work
            raise_if_stopped()
        except KeyboardInterrupt:
            exit_stopped()
        return module.main(rest)
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
