"""Soft labels grouped for display, one way everywhere: the contact sheet of `data inspect`, the explorer's
dataset grid, and the reader study's draw and rating curves.

    index, groups = group_soft_labels(soft, max_distinct=11, bins=10)
"""

from __future__ import annotations

import numpy as np


def group_soft_labels(soft, max_distinct: int, bins: int) -> tuple[np.ndarray, list]:
    """Group index per soft label (-1 where it is missing), and what each group holds.

    With at most `max_distinct` distinct values (rounded to 4 decimals) each value is a group, described by the
    value. With more, `bins` equal-width bins on [0, 1] are, each described by (low, high): a label on an edge
    opens the upper bin (0.3 is in 0.3-0.4, as written), and the last bin holds 1.
    """
    soft = np.asarray(soft, float)
    labelled = np.isfinite(soft)
    rounded = np.round(soft[labelled], 4)
    distinct = np.unique(rounded)
    index = np.full(len(soft), -1)
    if len(distinct) <= max_distinct:
        index[labelled] = np.searchsorted(distinct, rounded)
        return index, [float(v) for v in distinct]
    index[labelled] = np.minimum((soft[labelled] * bins).astype(int), bins - 1)
    return index, [(k / bins, (k + 1) / bins) for k in range(bins)]
