"""Training augmentations of stored patches: centre crop, rotation, the dihedral group, random crops and blur."""

from __future__ import annotations

import numpy as np
import torch

from patches.augment import AugmentConfig, augment_patch

OFF = dict(dihedral=False, rotate=False)


def stored_patch(size: int = 8, margin: int = 2) -> np.ndarray:
    """(S, S, 3) uint8 with a different value at every pixel and channel."""
    side = size + 2 * margin
    return (np.arange(side * side * 3) % 251).reshape(side, side, 3).astype(np.uint8)


def test_all_off_gives_the_stored_centre_crop():
    patch = stored_patch()
    assert np.array_equal(augment_patch(patch, 8, 2, AugmentConfig(**OFF)), patch[2:10, 2:10])


def test_rotation_keeps_a_colour():
    torch.manual_seed(0)
    patch = np.empty((12, 12, 3), np.uint8)
    patch[:] = (200, 30, 90)
    for _ in range(5):
        out = augment_patch(patch, 8, 2, AugmentConfig(dihedral=False, rotate=True))
        assert out.shape == (8, 8, 3) and (out == (200, 30, 90)).all()


def test_dihedral_draws_all_eight_flips_and_rotations():
    torch.manual_seed(0)
    patch = stored_patch(2, 0)
    seen = {augment_patch(patch, 2, 0, AugmentConfig(dihedral=True)).tobytes() for _ in range(200)}
    group = {np.ascontiguousarray(np.rot90(p, k)).tobytes() for p in (patch, patch[:, ::-1]) for k in range(4)}
    assert seen == group and len(group) == 8


def test_random_crops_reach_every_offset():
    torch.manual_seed(0)
    patch = stored_patch(8, 0)
    windows = {(y, x): patch[y: y + 7, x: x + 7].tobytes() for y in (0, 1) for x in (0, 1)}
    seen = {augment_patch(patch, 8, 0, AugmentConfig(**OFF, crop=7)).tobytes() for _ in range(100)}
    assert seen == set(windows.values())


def test_blur_stays_within_each_colour_channel():
    torch.manual_seed(0)
    patch = np.zeros((8, 8, 3), np.uint8)
    patch[::2, ::2, 0] = 255  # red dots on black
    outs = [augment_patch(patch, 8, 0, AugmentConfig(**OFF, blur=2.0)) for _ in range(40)]
    assert any(not np.array_equal(out, patch) for out in outs)  # some draws are blurred
    assert all((out[..., 1:] == 0).all() for out in outs)
