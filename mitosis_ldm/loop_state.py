"""Where a training loop stands inside its epoch, so that a run stopped mid-epoch resumes on the same batches.

accelerate's checkpoint restores the weights, the optimizer and the random number generators as they were at the
step; it does not say which batches of the epoch were already used, and the sampler drew the epoch's order from
generators that have moved on since. `TrainingRun.batches` therefore records, as it goes, the random state just
before the epoch's loader was started and just before each batch was asked for. A checkpoint keeps those two
beside the state at the step (`loop-state-RANK.safetensors`, one a process: each draws its own numbers). A resume
starts the epoch again from the first, takes the batches already used (the last one from the state it was asked
for in: the loader reads one batch ahead), and then returns every generator to the step's state. The batches,
their augmentations and every later draw are then those of a run that was never stopped.

The random state: torch's CPU and CUDA generators, NumPy's and Python's global ones, and every `torch.Generator`
the loader or its samplers hold. Stored as safetensors tensors and JSON metadata; nothing is pickled.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SNAPSHOTS = ("epoch_start", "before", "current")


def loader_generators(loader) -> list[torch.Generator]:
    """The distinct torch.Generator objects a (prepared) DataLoader and its samplers draw from."""
    holders = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    inner = getattr(holders[2], "batch_sampler", None)  # accelerate's BatchSamplerShard wraps the loader's own
    holders += [getattr(holders[2], "sampler", None), inner, getattr(inner, "sampler", None)]
    found: list[torch.Generator] = []
    for holder in holders:
        for name in ("generator", "synchronized_generator"):
            gen = getattr(holder, name, None)
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                found.append(gen)
    return found


def snapshot(generators) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict, generators) -> None:
    if len(state["generators"]) != len(generators):
        raise ValueError(f"the loader holds {len(generators)} generators, the saved state {len(state['generators'])}")
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for gen, saved in zip(generators, state["generators"]):
        gen.set_state(saved)
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def replay(batches, resumed: "LoopState", generators) -> int:
    """Take from the epoch's fresh iterator the batches the stopped run had taken; returns how many there were."""
    taken = 0
    while taken < resumed.taken:
        if taken == resumed.taken - 1:
            restore(resumed.before, generators)  # the loader reads ahead: its next batch is read from here
        try:
            next(batches)
        except StopIteration:
            break
        taken += 1
    return taken


@dataclass
class LoopState:
    """Epoch `epoch`, of which `taken` batches were asked for; the random state at the three moments above."""

    epoch: int
    taken: int
    epoch_start: dict
    before: dict
    current: dict | None = None

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors, meta = {}, {"epoch": str(self.epoch), "taken": str(self.taken)}
        for name in SNAPSHOTS:
            state = getattr(self, name)
            tensors[f"{name}.torch"] = state["torch"]
            for i, gen in enumerate(state["generators"]):
                tensors[f"{name}.generator.{i}"] = gen
            for i, cuda in enumerate(state.get("cuda", [])):
                tensors[f"{name}.cuda.{i}"] = cuda
            kind, keys, pos, has_gauss, cached = state["numpy"]
            tensors[f"{name}.numpy"] = torch.from_numpy(np.asarray(keys, np.int64))
            version, internal, gauss_next = state["python"]
            meta[name] = json.dumps({"numpy": [kind, int(pos), int(has_gauss), float(cached)],
                                     "python": [version, list(internal), gauss_next],
                                     "generators": len(state["generators"]), "cuda": len(state.get("cuda", []))})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> "LoopState":
        from safetensors import safe_open

        states = {}
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            for name in SNAPSHOTS:
                info = json.loads(meta[name])
                kind, pos, has_gauss, cached = info["numpy"]
                version, internal, gauss_next = info["python"]
                state = {"torch": handle.get_tensor(f"{name}.torch"),
                         "numpy": (kind, handle.get_tensor(f"{name}.numpy").numpy().astype(np.uint32), pos,
                                   has_gauss, cached),
                         "python": (version, tuple(internal), gauss_next),
                         "generators": [handle.get_tensor(f"{name}.generator.{i}") for i in range(info["generators"])]}
                if info["cuda"]:
                    state["cuda"] = [handle.get_tensor(f"{name}.cuda.{i}") for i in range(info["cuda"])]
                states[name] = state
        return cls(int(meta["epoch"]), int(meta["taken"]), **states)
