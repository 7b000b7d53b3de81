"""Extra judges in the report: folders that other commands computed (posterior, reader study, CAS).

The report does not compute them; it reads them. A judge's module offers a
`make(held_out) -> Extra` callable: it gets the held-out real patches the
report already scored with the classifier ensemble (so a comparison uses the
same patches and the same discriminative scores), and returns the metrics to
store under `metrics.json[key]` plus a writer for its page section.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class HeldOut:
    """The held-out real patches of the report's --dataset, as the report measured them."""

    classifier: object
    dataset_root: Path
    split: str                 # "test", "val" or "all"
    ids: list[str]
    images: np.ndarray         # (N, H, W, 3) uint8
    soft_labels: np.ndarray    # (N,)
    hard_labels: np.ndarray    # (N,)
    true_degree: np.ndarray    # (N,) NaN where unknown
    scores: np.ndarray         # (N,) ensemble mean P(mitotic)
    score_stds: np.ndarray     # (N,) std over members
    config: object             # the ReportConfig
    log: Callable[[str], None]


@dataclass
class Extra:
    """One extra judge's contribution: metrics.json[key] = metrics, and a section titled `title`."""

    key: str
    title: str
    metrics: dict
    write: Callable[[Path], str]   # writes its own files into the report folder; returns the section's HTML
