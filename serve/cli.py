"""`mitosis-ldm serve`: the local slide explorer.

    mitosis-ldm serve --pipeline runs/demo/diffusion/model --classifier runs/demo/classifier/model \
        --slides data/cache/cmu_small_region.svs [--dataset runs/demo/data/cmu] [--host 127.0.0.1 --port 8765]

Open the printed address, click a nucleus on the slide, and watch it rendered at
y = 0 ... 1 beside its classifier score and morphology. Only the slides and
datasets named here are served; it binds to localhost unless told otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mitosis_ldm.errors import UserError, check_at_least, user_errors

MIN_BODY = 1024  # the smallest --max-body: the page's JSON requests stay well under it


def load_datasets(paths: list[str]) -> dict:
    from patches.dataset import PatchDataset

    datasets = {}
    for raw in paths:
        path = Path(raw)
        ds = PatchDataset(path)  # read_meta gives the one-line error for a non-dataset
        if path.name in datasets:
            raise UserError(f"--dataset: two datasets are named {path.name}; datasets are addressed by folder name")
        datasets[path.name] = (path, ds)
    return datasets


def build(args):
    """Load everything named on the command line; any problem is a UserError before the server starts."""
    import torch

    from classifier.model import ClassifierEnsemble
    from diffusion.pipeline import MitosisPipeline
    from mitosis_ldm.launch import process_state

    from .app import create_app
    from .explorer import Explorer
    from .tiles import SlideRegistry
    from .worker import ModelWorker

    if not args.slides and not args.dataset:
        raise UserError("--slides: give at least one slide (or folder of slides) or a --dataset")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port: must be in 1..65535, got {args.port}")
    check_at_least(args.queue, "--queue")
    if args.max_body < MIN_BODY:
        raise UserError(f"--max-body: must be >= {MIN_BODY} bytes (the page's own requests are a few hundred), "
                        f"got {args.max_body}")
    if args.threads is not None:
        check_at_least(args.threads, "--threads")
        torch.set_num_threads(args.threads)
    if Path(args.exports).exists() and not Path(args.exports).is_dir():
        raise UserError(f"--exports: {args.exports} exists and is not a folder")
    slides = SlideRegistry(args.slides or [])
    datasets = load_datasets(args.dataset or [])
    device = process_state().device  # a GPU when there is one: renders and scores run there
    pipeline = MitosisPipeline.from_pretrained(args.pipeline).to(device)
    classifier = ClassifierEnsemble.from_pretrained(args.classifier).to(device)
    explorer = Explorer(slides, datasets, pipeline, classifier, args.exports, pipeline_path=args.pipeline,
                        classifier_path=args.classifier, trace=not args.eager)
    if explorer.eager_reason not in (None, "not asked"):
        print(f"warning: rendering eagerly: {explorer.eager_reason}", file=sys.stderr)
    return create_app(explorer, ModelWorker(args.queue), max_body=args.max_body)


def listen(host: str, port: int):
    """The server's socket, bound before the start-up banner: a busy port or an unknown host is one line, not
    uvicorn's log record after the banner."""
    import socket

    try:
        # IPv4 unless the host is an IPv6 address, as uvicorn binds (so `localhost` stays 127.0.0.1)
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, family=socket.AF_INET6 if ":" in host else socket.AF_INET, type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise UserError(f"--host: cannot resolve '{host}' ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(f"--port: cannot listen on {host}:{port} ({err.strerror})") from None
    return sock


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mitosis-ldm serve", description="Local slide explorer: click a nucleus, "
                                "watch it turn mitotic.")
    p.add_argument("--pipeline", required=True, help="diffusion pipeline folder")
    p.add_argument("--classifier", required=True, help="classifier ensemble folder")
    p.add_argument("--slides", nargs="+", action="extend", help="slide files or folders of slides")
    p.add_argument("--dataset", action="append", help="patch dataset folder to browse (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--exports", default="runs/serve/exports", help="folder the export button writes into")
    p.add_argument("--queue", type=int, default=16, help="model requests running or waiting before 503 (default 16)")
    p.add_argument("--max-body", type=int, default=16_384, help="largest request body in bytes (default 16384)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--eager", action="store_true", help="run the UNet and decoder as plain modules instead of "
                   "frozen traced graphs (the same frames, slower)")
    return p


@user_errors
def main(argv=None):
    import uvicorn

    args = parser().parse_args(argv)
    app = build(args)
    sock = listen(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: anyone who can reach this machine can browse the slides",
              file=sys.stderr)
    explorer = app.state.explorer
    print(f"explorer: http://{args.host}:{args.port}/  ({len(explorer.slides.names())} slides, "
          f"{len(explorer.datasets)} datasets; exports to {args.exports})", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


if __name__ == "__main__":
    main()
