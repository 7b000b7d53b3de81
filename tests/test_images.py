"""mitosis_ldm/images.py: what read_image accepts and refuses, and where a strip puts each frame."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from mitosis_ldm.errors import UserError
from mitosis_ldm.images import read_image, strip


def test_an_opaque_rgba_image_is_read_as_rgb_and_a_translucent_one_is_refused(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (8, 12, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert np.array_equal(read_image(tmp_path / "opaque.png"), rgba[..., :3])
    rgba[2, 3, 3] = 128  # one half-transparent pixel: dropping the alpha would change what the image shows
    Image.fromarray(rgba).save(tmp_path / "translucent.png")
    with pytest.raises(UserError, match=r"translucent.png: expected an RGB image with 3 channels, got 4"):
        read_image(tmp_path / "translucent.png")


def test_a_16_bit_image_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "deep.tif", np.full((8, 8, 3), 1000, np.uint16))
    with pytest.raises(UserError, match=r"deep.tif: expected 8-bit pixels, got uint16"):
        read_image(tmp_path / "deep.tif")


def _frames(n, h=4, w=6):
    """n flat frames, frame i filled with grey level 10 * (i + 1)."""
    return np.stack([np.full((h, w, 3), 10 * (i + 1), np.uint8) for i in range(n)])


def test_a_strip_puts_frame_i_upscaled_after_i_frames_and_gaps():
    out = strip(_frames(3), scale=2, gap=2)
    assert out.shape == (8, 3 * 12 + 2 * 2, 3)
    for i in range(3):
        left = i * (12 + 2)
        assert (out[:, left: left + 12] == 10 * (i + 1)).all()
        if i < 2:
            assert (out[:, left + 12: left + 14] == 255).all()  # the white gap
