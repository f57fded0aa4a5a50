"""The separable binary morphology against ``scipy.ndimage`` on random masks, borders included."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from custom.morphology import (
    INPLANE,
    ball_dilation,
    bbox,
    box_morphology,
    cross_dilation,
    dilate,
    fill_border_open_holes,
    largest_connected_component,
)


def _mask(seed: int, shape=(17, 13, 9), p: float = 0.3) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < p


@pytest.mark.parametrize("radii", [1, 2, (2, 1, 0), (0, 3, 1), 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_box_morphology_equals_minimum_and_maximum_filters(radii, seed):
    m = _mask(seed, p=0.7)
    size = [2 * r + 1 for r in ((radii,) * 3 if np.isscalar(radii) else radii)]
    eroded = ndimage.minimum_filter(m, size=size, mode="nearest")  # beyond the border counts as foreground
    dilated = ndimage.maximum_filter(m, size=size, mode="constant", cval=False)
    np.testing.assert_array_equal(box_morphology(m, radii, erode=True), eroded)
    np.testing.assert_array_equal(box_morphology(m, radii, erode=False), dilated)


@pytest.mark.parametrize("r", [1, 2, 3, 12])
def test_ball_dilation_equals_the_distance_transform(r):
    fg = _mask(r, shape=(30, 26, 20), p=0.002)
    fg[0, 0, 0] = fg[-1, 5, -1] = True
    np.testing.assert_array_equal(ball_dilation(fg, r), ndimage.distance_transform_edt(~fg) <= r)


def test_cross_dilation_equals_one_step_of_the_6_neighbourhood():
    m = _mask(3, p=0.05)
    expected = ndimage.binary_dilation(m, structure=ndimage.generate_binary_structure(3, 1))
    np.testing.assert_array_equal(cross_dilation(m), expected)
    flat = _mask(4, shape=(5, 1, 4))  # an axis of size 1 has no neighbours along it
    np.testing.assert_array_equal(
        cross_dilation(flat), ndimage.binary_dilation(flat, structure=ndimage.generate_binary_structure(3, 1))
    )


def test_dilate_stays_inside_the_grown_bounding_box_and_checks_its_arguments():
    fg = np.zeros((20, 20, 20), bool)
    fg[5, 6, 7] = True
    assert bbox(fg, 2) == (slice(3, 8), slice(4, 9), slice(5, 10))
    assert int(dilate(fg, 1, "ball").sum()) == 7 and int(dilate(fg, 1, "cube").sum()) == 27
    assert not dilate(np.zeros_like(fg), 3, "ball").any()
    with pytest.raises(ValueError, match="radius"):
        dilate(fg, -1, "ball")
    with pytest.raises(ValueError, match="element"):
        dilate(fg, 1, "sphere")


def test_components_and_holes():
    m = np.zeros((12, 12, 4), bool)
    m[1:4, 1:4] = True
    m[6:11, 6:11] = True  # the larger one
    np.testing.assert_array_equal(
        largest_connected_component(m), np.pad(np.ones((5, 5, 4), bool), ((6, 1),) * 2 + ((0, 0),))
    )
    ring = np.zeros((9, 9, 3), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False  # a hole through every slice: open in 3D at the first and last slice, closed in-plane
    assert fill_border_open_holes(ring, INPLANE, border_axes=(0, 1))[4, 4].all()
    assert not fill_border_open_holes(ring, ndimage.generate_binary_structure(3, 1), (0, 1, 2))[4, 4].any()
