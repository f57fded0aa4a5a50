"""Orthogonal-slice previews: the PNG, display conventions, orientation independence, overlays and legend."""

from __future__ import annotations

import numpy as np
import pytest
from parameterized import parameterized
from PIL import Image

from custom.preview import PALETTE, _panels, save_preview

AFFINES = {
    "RAS": np.diag([2.0, 2.0, 4.0, 1.0]),
    "LPS": np.array([[-2.0, 0, 0, 62.0], [0, -2.0, 0, 78.0], [0, 0, 4.0, -40.0], [0, 0, 0, 1.0]]),
}


def _volume():
    """RAS volume (32 x 40 x 24, 2 x 2 x 4 mm): a body, a marker at the patient's right-anterior-top, two labels."""
    img = np.full((32, 40, 24), -1000.0, np.float32)
    img[4:28, 6:34, 2:22] = 40.0
    img[22:28, 26:34, 16:22] = 900.0  # right (high x), anterior (high y), superior (high z)
    lbl = np.zeros(img.shape, np.uint8)
    lbl[8:14, 10:20, 6:14] = 1
    lbl[16:24, 12:22, 8:16] = 3
    return img, lbl


def _as(orientation, img, lbl):
    """The same anatomy stored in another voxel order."""
    if orientation == "LPS":
        return img[::-1, ::-1, :].copy(), lbl[::-1, ::-1, :].copy(), AFFINES["LPS"]
    return img, lbl, AFFINES["RAS"]


def test_png_written_with_expected_size_and_content(tmp_path):
    img, lbl = _volume()
    path = save_preview(img, lbl, AFFINES["RAS"], tmp_path / "sub" / "p.png", ["background", "liver", "x", "spleen"])
    assert path.exists() and path.suffix == ".png"
    png = np.asarray(Image.open(path).convert("RGB"))
    h, w, _ = png.shape
    assert 600 <= w <= 1600 and 300 <= h <= 800
    assert png.std() > 20  # not blank
    for i in (1, 3):  # overlay colours and legend swatches
        assert (np.abs(png.astype(int) - PALETTE[i - 1]).sum(-1) == 0).sum() > 10


@parameterized.expand([("RAS",), ("LPS",)])
def test_same_picture_for_any_voxel_order(orientation):
    img, lbl = _volume()
    ref = _panels(img, lbl, AFFINES["RAS"], (-160, 240))
    other = _panels(*_as(orientation, img, lbl), (-160, 240))
    assert ref[1] == other[1]
    for (n1, t1), (n2, t2) in zip(ref[0], other[0], strict=True):
        assert n1 == n2
        np.testing.assert_array_equal(t1, t2)


def test_display_conventions():
    """Axial: patient right on the image left, anterior up; coronal/sagittal: head up; sagittal: anterior left."""
    img, _ = _volume()
    lbl = np.zeros(img.shape, np.uint8)
    lbl[22:28, 26:34, 16:22] = 1  # centre the slices on the marker
    tiles, present = _panels(img, lbl, AFFINES["RAS"], (-160, 240))
    assert present == {1} and [n for n, _ in tiles] == ["axial", "coronal", "sagittal"]

    def bright_quadrant(t):
        g = t.astype(float).mean(-1)
        h, w = g.shape
        q = {
            (r, c): g[r * h // 2 : (r + 1) * h // 2, c * w // 2 : (c + 1) * w // 2].mean()
            for r in (0, 1)
            for c in (0, 1)
        }
        return max(q, key=q.get)

    t = dict(tiles)
    assert bright_quadrant(t["axial"]) == (0, 0)  # top (anterior), left (patient right)
    assert bright_quadrant(t["coronal"]) == (0, 0)  # top (head), left (patient right)
    assert bright_quadrant(t["sagittal"]) == (0, 0)  # top (head), left (anterior)
    # physical aspect ratio: 32 x 2 mm wide, 40 x 2 mm high axial; 24 x 4 mm high coronal
    ah, aw = t["axial"].shape[:2]
    ch, cw = t["coronal"].shape[:2]
    assert aw / ah == pytest.approx(64 / 80, rel=0.03) and ch / cw == pytest.approx(96 / 64, rel=0.03)


def test_without_label_and_with_channel_axis(tmp_path):
    img, lbl = _volume()
    p1 = save_preview(img, None, AFFINES["RAS"], tmp_path / "a.png")
    p2 = save_preview(img[None], lbl[None], AFFINES["RAS"], tmp_path / "b.png", label_names={"liver": 1, "spleen": 3})
    assert Image.open(p1).size[1] < Image.open(p2).size[1]  # no legend without labels
    with pytest.raises(ValueError, match="label shape"):
        save_preview(img, lbl[:, :, :5], AFFINES["RAS"], tmp_path / "c.png")
    with pytest.raises(ValueError, match="3D"):
        save_preview(img[0], None, AFFINES["RAS"], tmp_path / "d.png")


def test_preview_of_a_phantom(tmp_path):
    from tools.phantom import preview

    out = preview(seed=1, out=str(tmp_path / "ph.png"), preset="tiny", labels="extended")
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[1] >= 600 and png.std() > 30
    n_colours = sum((np.abs(png.astype(int) - c).sum(-1) == 0).sum() > 5 for c in PALETTE[:10])
    assert n_colours >= 8  # most of the ten labels are drawn (legend swatches at least)
