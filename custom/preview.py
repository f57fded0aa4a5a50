"""Orthogonal-slice preview PNGs of a CT volume with an optional label overlay (Pillow only).

Used for the phantom docs and later for predicted labels, so it takes plain arrays and an affine and knows nothing
about phantoms. The volume is reoriented to RAS first, so every input orientation looks the same: axial in the
radiological convention (patient right on the image left, anterior at the top), coronal and sagittal with the head
up (sagittal: anterior on the left). Each panel is resampled to square millimetres, so aspect ratios are physical.

>>> import numpy as np, tempfile, os
>>> img = np.full((40, 40, 20), -1000, np.int16); img[10:30, 10:30, 5:15] = 50
>>> lbl = np.zeros(img.shape, np.uint8); lbl[15:25, 15:25, 8:12] = 1
>>> path = save_preview(img, lbl, np.diag([2.0, 2.0, 4.0, 1.0]), os.path.join(tempfile.mkdtemp(), "p.png"),
...                     label_names=["background", "liver"])
>>> path.suffix
'.png'
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["save_preview", "PALETTE"]

#: Distinct overlay colours, label id i uses PALETTE[(i - 1) % len(PALETTE)].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (60, 120, 255),  # blue
    (255, 140, 20),  # orange
    (170, 60, 230),  # purple
    (60, 200, 75),  # green
    (255, 225, 25),  # yellow
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (160, 110, 40),  # brown
    (250, 190, 190),  # pink
    (0, 128, 128),  # teal
    (200, 230, 110),  # lime
    (128, 0, 0),  # maroon
    (170, 255, 195),  # mint
    (128, 128, 0),  # olive
    (255, 215, 180),  # apricot
    (0, 0, 128),  # navy
    (190, 190, 190),  # grey
)


def _names(label_names, ids) -> dict[int, str]:
    if label_names is None:
        return {int(i): str(int(i)) for i in ids}
    if isinstance(label_names, Mapping):
        items = list(label_names.items())
        if items and isinstance(items[0][0], str) and not str(items[0][0]).isdigit():
            return {int(v): str(k) for k, v in items}  # {name: id}
        return {int(k): str(v) for k, v in items}  # {id: name}
    return {i: str(n) for i, n in enumerate(label_names)}


def _to_ras(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The array in RAS voxel order (nearest axis codes of the affine) and the matching affine."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, arr.shape)
    return nib.orientations.apply_orientation(arr, ornt), ras_affine


def _squeeze(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"expected a 3D volume (optionally with a leading channel of size 1), got shape {a.shape}")
    return a


def _resize(a: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    from PIL import Image

    if nearest:
        img = Image.fromarray(a.astype(np.int32), mode="I")
        return np.asarray(img.resize(size, Image.NEAREST)).astype(np.int32)
    img = Image.fromarray(a.astype(np.float32), mode="F")
    return np.asarray(img.resize(size, Image.BILINEAR))


def _panels(img: np.ndarray, lbl: np.ndarray | None, affine: np.ndarray, window) -> tuple[list, set[int]]:
    """RGB tiles (axial, coronal, sagittal) through the label centroid, display conventions applied."""
    img, ras = _to_ras(img, affine)
    if lbl is not None:
        lbl = _to_ras(lbl, affine)[0].astype(np.int32)
    sp = np.sqrt((ras[:3, :3] ** 2).sum(0))
    if lbl is not None and (lbl > 0).any():
        c = np.round(np.argwhere(lbl > 0).mean(0)).astype(int)
    else:
        c = np.array(img.shape) // 2
    # RAS arrays: axis 0 towards the patient's right, 1 anterior, 2 superior. Axial: patient right on the image left,
    # anterior up; coronal: head up, patient right on the left; sagittal: head up, anterior on the left.
    views = [
        ("axial", lambda a: a[::-1, ::-1, c[2]].T, sp[1], sp[0]),
        ("coronal", lambda a: a[::-1, c[1], ::-1].T, sp[2], sp[0]),
        ("sagittal", lambda a: a[c[0], ::-1, ::-1].T, sp[2], sp[1]),
    ]
    lo, hi = float(window[0]), float(window[1])
    extent = max(img.shape[0] * sp[0], img.shape[1] * sp[1], img.shape[2] * sp[2])
    ppm = 420.0 / extent  # pixels per mm, shared by the panels so that sizes compare
    tiles, present = [], set()
    for name, take, srow, scol in views:
        g = take(img)
        h = max(1, int(round(g.shape[0] * srow * ppm)))
        w = max(1, int(round(g.shape[1] * scol * ppm)))
        gray = np.clip((_resize(g, (w, h), False) - lo) / (hi - lo), 0, 1) * 255.0
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        if lbl is not None:
            lab = _resize(take(lbl), (w, h), True)
            edge = np.zeros(lab.shape, bool)
            edge[1:, :] |= lab[1:, :] != lab[:-1, :]
            edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
            for i in np.unique(lab):
                if i <= 0:
                    continue
                present.add(int(i))
                col = np.array(PALETTE[(int(i) - 1) % len(PALETTE)], np.float32)
                m = lab == i
                rgb[m] = 0.6 * rgb[m] + 0.4 * col
                rgb[m & edge] = col
        tiles.append((name, rgb.astype(np.uint8)))
    if lbl is not None:  # the legend lists every label in the volume, not only those in the three slices
        present |= {int(i) for i in np.unique(lbl) if i > 0}
    return tiles, present


def save_preview(
    image,
    label,
    affine,
    path,
    label_names=None,
    window: tuple[float, float] = (-160, 240),
    title: str | None = None,
) -> Path:
    """Write a PNG with axial, coronal and sagittal slices through the label centroid; return its path.

    Args:
        image: (X, Y, Z) array (or (1, X, Y, Z)), any voxel orientation; values in HU.
        label: integer array of the same shape, or None for no overlay.
        affine: 4x4 voxel-to-world matrix of both arrays.
        path: output PNG path (parent folders are created).
        label_names: names by id: a sequence (index = id), ``{id: name}`` or ``{name: id}``; the legend shows the ids
            present in ``label``.
        window: display window (HU) as (low, high).
        title: optional line written above the panels.
    """
    from PIL import Image, ImageDraw, ImageFont

    img = _squeeze(image).astype(np.float32)
    lbl = None if label is None else _squeeze(label)
    if lbl is not None and lbl.shape != img.shape:
        raise ValueError(f"label shape {lbl.shape} differs from image shape {img.shape}")
    tiles, present = _panels(img, lbl, np.asarray(affine, float), window)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    gap, top = 8, 28 if title else 8
    names = _names(label_names, sorted(present))
    rows = (len(present) + 3) // 4
    tile_h = max(t.shape[0] for _, t in tiles)
    width = sum(t.shape[1] for _, t in tiles) + gap * (len(tiles) + 1)
    height = top + tile_h + 24 + (22 * rows + 8 if present else 0)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 6), title, fill=(255, 255, 255), font=font)
    x = gap
    for name, t in tiles:
        canvas.paste(Image.fromarray(t), (x, top))
        draw.text((x + 4, top + tile_h + 4), name, fill=(200, 200, 200), font=font)
        x += t.shape[1] + gap
    y0 = top + tile_h + 24
    for k, i in enumerate(sorted(present)):
        cx, cy = gap + (k % 4) * (width // 4), y0 + (k // 4) * 22
        draw.rectangle([cx, cy + 2, cx + 14, cy + 16], fill=PALETTE[(i - 1) % len(PALETTE)])
        draw.text((cx + 20, cy + 1), f"{i} {names.get(i, str(i))}", fill=(255, 255, 255), font=font)
    from custom.outputs import atomic_write

    path = Path(path)
    with atomic_write(path, suffix=path.suffix) as tmp:
        canvas.save(tmp)
    return path
