"""Synthetic abdominal CT phantoms: the project's data for tests, the demo and benchmarks.

The repository ships no patient data, so the cascade is trained and tested on generated CTs. A model trained on toys
(spheres in noise) learns toys; these phantoms therefore draw a torso with the anatomy a segmentation network has to
tell apart: skin, subcutaneous fat, abdominal wall and back muscles, a spine with vertebral bodies, discs, spinal canal
and posterior elements, ribs with costal cartilages, lung bases above a domed diaphragm, the bottom of the heart, bowel
loops (wall, fluid and gas) and a colon with stool, a patient table, and the organs: liver (with hepatic veins), spleen,
stomach (wall, fluid and air), gallbladder, pancreas, both kidneys (cortex, medulla, sinus, pelvis), aorta with its
main branches, inferior vena cava with renal and iliac veins, and the portal, splenic and superior mesenteric veins.

Every organ is an implicit surface (ellipsoids or swept spheres along a spline) with a smooth random deformation,
placed relative to the spine and the body wall, and scaled so that its volume falls in the range seen on real CTs.
Each case draws its own body size, organ sizes, shapes and positions, contrast phase (native, arterial,
portal-venous), noise, partial-volume blur, voxel spacing, number of slices and voxel orientation (RAS, LPS, LAS: the
array is really flipped and the affine says so, so the world coordinates of the anatomy are the same in every
orientation). Everything follows from one integer seed.

Geometry is built in a canonical patient frame in millimetres: +x patient right, +y anterior, +z superior (RAS, the
NIfTI world frame), origin at the centre of the torso at about the L1/L2 level. Each structure is evaluated only in
its bounding box; the label map is the geometric truth at voxel centres, the image is blurred afterwards.

>>> from custom.phantom import generate_phantom
>>> p = generate_phantom(0, preset="tiny")
>>> p.image.shape == p.label.shape, p.label.dtype.name, sorted(p.labels)[:2]
(True, 'uint8', ['artery', 'gallbladder'])
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, sparse

from custom.labels import STRUCTURES, label_names, resolve_labels

__all__ = [
    "GENERATOR_VERSION",
    "PRESETS",
    "PHASES",
    "TISSUE_HU",
    "OWNERS",
    "Phantom",
    "generate_phantom",
    "write_dataset",
    "preview",
]

GENERATOR_VERSION = "1.0.0"

#: Contrast phases and the probability with which a case draws each.
PHASES: dict[str, float] = {"native": 0.2, "arterial": 0.25, "portal_venous": 0.55}

#: Orientations a case draws from (codes as ``nibabel.aff2axcodes`` gives them).
ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS")

#: Grid presets. ``spacing``: in-plane range (mm); ``slice_spacing``: the values a case draws from (mm);
#: ``z_extent``: field-of-view length range (mm), raised where the organs need more; ``max_slices``: memory guard.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "matrix": 512,
        "spacing": (0.6, 0.9),
        "slice_spacing": (0.5, 0.625, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5),
        "z_extent": (200.0, 400.0),
        "max_slices": 600,
    },
    "demo": {
        "matrix": 128,
        "spacing": (2.4, 3.6),
        "slice_spacing": (2.5, 3.0, 3.5, 4.0, 5.0),
        "z_extent": (240.0, 330.0),
        "max_slices": 160,
    },
    "tiny": {
        "matrix": 64,
        "spacing": (5.5, 7.0),
        "slice_spacing": (6.0, 7.0, 8.0),
        "z_extent": (240.0, 300.0),
        "max_slices": 48,
    },
}

#: Overrides ``generate_phantom`` accepts, with what they replace.
OVERRIDES: dict[str, str] = {
    "matrix": "in-plane matrix size: int or (nx, ny)",
    "spacing": "in-plane spacing in mm (float), or (sx, sy, sz)",
    "slice_spacing": "slice spacing in mm",
    "n_slices": "number of slices (the field of view keeps its top and grows or shrinks at the bottom)",
    "z_extent": "field-of-view length in mm (ignored when n_slices is given)",
    "orientation": "voxel orientation code, one of RAS, LAS, LPS, RPS, RAI, LAI, RPI, LPI",
    "phase": f"contrast phase, one of {list(PHASES)}",
    "noise_std": "CT noise standard deviation in HU",
    "recon_circle": "True: voxels outside the reconstruction circle are -2048 HU, as some scanners write them",
}

# ----------------------------------------------------------------------------------------------------------- tissues

_TISSUE_NAMES = (
    "air",
    "table_shell",
    "table_foam",
    "skin",
    "fat",
    "visceral_fat",
    "muscle",
    "cortical_bone",
    "cancellous_bone",
    "disc",
    "csf",
    "cartilage",
    "lung",
    "myocardium",
    "heart_blood",
    "liver",
    "hepatic_vein",
    "spleen",
    "pancreas",
    "kidney_cortex",
    "kidney_medulla",
    "urine",
    "bile",
    "gallbladder_wall",
    "gi_wall",
    "gi_fluid",
    "gas",
    "stool",
    "arterial_blood",
    "portal_blood",
    "caval_blood",
)
T = {name: i for i, name in enumerate(_TISSUE_NAMES)}

#: HU range per tissue, either one range for every phase or one per phase. Each case draws one value per tissue.
TISSUE_HU: dict[str, Any] = {
    "air": (-1000, -1000),
    "table_shell": (250, 450),
    "table_foam": (-960, -900),
    "skin": (10, 50),
    "fat": (-115, -90),
    "visceral_fat": (-110, -85),
    "muscle": {"native": (42, 52), "arterial": (48, 58), "portal_venous": (50, 60)},
    "cortical_bone": (700, 1000),
    "cancellous_bone": (180, 300),
    "disc": (70, 100),
    "csf": (5, 20),
    "cartilage": (100, 160),
    "lung": (-880, -800),
    "myocardium": {"native": (40, 50), "arterial": (100, 140), "portal_venous": (90, 120)},
    "heart_blood": {"native": (35, 45), "arterial": (220, 320), "portal_venous": (130, 170)},
    "liver": {"native": (50, 65), "arterial": (60, 80), "portal_venous": (90, 110)},
    "hepatic_vein": {"native": (35, 45), "arterial": (50, 70), "portal_venous": (130, 170)},
    "spleen": {"native": (40, 50), "arterial": (95, 130), "portal_venous": (100, 120)},
    "pancreas": {"native": (35, 45), "arterial": (100, 130), "portal_venous": (80, 100)},
    "kidney_cortex": {"native": (30, 40), "arterial": (180, 250), "portal_venous": (150, 200)},
    "kidney_medulla": {"native": (28, 38), "arterial": (70, 110), "portal_venous": (145, 195)},
    "urine": (0, 15),
    "bile": (0, 20),
    "gallbladder_wall": {"native": (30, 40), "arterial": (50, 70), "portal_venous": (60, 90)},
    "gi_wall": {"native": (35, 45), "arterial": (70, 100), "portal_venous": (80, 110)},
    "gi_fluid": (5, 25),
    "gas": (-1000, -980),
    "stool": (-60, 40),
    "arterial_blood": {"native": (35, 45), "arterial": (250, 350), "portal_venous": (130, 180)},
    "portal_blood": {"native": (35, 45), "arterial": (80, 120), "portal_venous": (140, 180)},
    "caval_blood": {"native": (35, 45), "arterial": (60, 100), "portal_venous": (110, 150)},
}

#: Texture amplitude (HU) per tissue: (fine ~2.5 mm, coarse ~12 mm) correlated fields; arterial spleen is mottled.
_TEXTURE = {
    "table_shell": (15, 0),
    "table_foam": (15, 0),
    "skin": (5, 0),
    "fat": (6, 4),
    "visceral_fat": (8, 6),
    "muscle": (6, 3),
    "cortical_bone": (60, 40),
    "cancellous_bone": (45, 30),
    "disc": (5, 0),
    "csf": (3, 0),
    "cartilage": (15, 10),
    "lung": (25, 20),
    "myocardium": (5, 0),
    "heart_blood": (4, 0),
    "liver": (4, 4),
    "hepatic_vein": (3, 0),
    "spleen": (4, 4),
    "pancreas": (9, 4),
    "kidney_cortex": (6, 0),
    "kidney_medulla": (6, 0),
    "urine": (2, 0),
    "bile": (2, 0),
    "gallbladder_wall": (3, 0),
    "gi_wall": (6, 4),
    "gi_fluid": (6, 6),
    "gas": (5, 0),
    "stool": (60, 40),
    "arterial_blood": (4, 0),
    "portal_blood": (4, 0),
    "caval_blood": (6, 8),
}

#: Structures the owner map tracks: the labellable ones first (owner id = index + 1), then unlabelled ones.
OWNERS: tuple[str, ...] = (*STRUCTURES, "duodenum", "colon", "small_bowel", "esophagus", "heart")
_OWN = {name: i + 1 for i, name in enumerate(OWNERS)}

_BONE = (T["cortical_bone"], T["cancellous_bone"], T["disc"], T["csf"], T["cartilage"])
#: Tissues vessels must not overwrite.
_VESSEL_PROTECTED = np.zeros(len(_TISSUE_NAMES), bool)
_VESSEL_PROTECTED[[*_BONE, T["air"], T["skin"], T["table_shell"], T["table_foam"]]] = True

#: Calibration targets (ml): (low, high) drawn, times a body-size factor 0.8-1.25 when scaled, clipped to
#: (min, max). Inside the ranges of real CTs (REFERENCE.md) with room for what later structures carve out.
_TARGET_ML = {
    "liver": (1100.0, 1400.0, 1100.0, 1600.0, True),
    "spleen": (145.0, 225.0, 138.0, 245.0, True),
    "kidney": (105.0, 155.0, 90.0, 170.0, True),
    "stomach": (170.0, 300.0, 145.0, 340.0, True),
    "gallbladder": (39.0, 51.0, 39.0, 51.0, False),
    "pancreas": (72.0, 98.0, 66.0, 106.0, True),
}

_BIG = np.float32(1e4)

# -------------------------------------------------------------------------------------------------- small helpers


def _smoothstep(e0: float, e1: float, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smin(a, b, k: float):
    """Polynomial smooth minimum (smooth union of two signed distances)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a, b, k: float):
    return -_smin(-a, -b, k)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _frame(w_axis, v_hint) -> np.ndarray:
    """Rotation whose columns are orthonormal (u, v, w) with w along ``w_axis`` and v close to ``v_hint``."""
    w = _unit(w_axis)
    u = _unit(np.cross(v_hint, w))
    v = np.cross(w, u)
    return np.stack([u, v, w], axis=1)


def _grid3(xs, ys, zs, c):
    return (
        (np.asarray(xs, np.float32) - np.float32(c[0]))[:, None, None],
        (np.asarray(ys, np.float32) - np.float32(c[1]))[None, :, None],
        (np.asarray(zs, np.float32) - np.float32(c[2]))[None, None, :],
    )


def _ellipsoid(xs, ys, zs, c, radii, rot=None) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid with centre c, semi-axes radii, local axes = columns of rot."""
    x, y, z = _grid3(xs, ys, zs, c)
    r = np.asarray(radii, np.float32)
    if rot is None:
        u, v, w = x, y, z
    else:
        m = np.asarray(rot, np.float32)
        u = m[0, 0] * x + m[1, 0] * y + m[2, 0] * z
        v = m[0, 1] * x + m[1, 1] * y + m[2, 1] * z
        w = m[0, 2] * x + m[1, 2] * y + m[2, 2] * z
    k0 = np.sqrt((u / r[0]) ** 2 + (v / r[1]) ** 2 + (w / r[2]) ** 2)
    k1 = np.sqrt((u / r[0] ** 2) ** 2 + (v / r[1] ** 2) ** 2 + (w / r[2] ** 2) ** 2)
    return (k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)).astype(np.float32)


def _plane(xs, ys, zs, p, n) -> np.ndarray:
    """Signed distance to the half-space {q: (q - p) . n <= 0} (n need not be unit)."""
    n = _unit(n).astype(np.float32)
    x, y, z = _grid3(xs, ys, zs, p)
    return (n[0] * x + n[1] * y + n[2] * z).astype(np.float32)


def _spline(ctrl, radii, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Catmull-Rom spline through control points, resampled every ``step`` mm; radii interpolated along it."""
    p = np.asarray(ctrl, float)
    r = np.asarray(radii, float)
    if len(p) == 1:
        return p, r
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    t = np.linspace(0.0, 1.0, 24, endpoint=False)[:, None]
    dense, par = [], []
    for j in range(len(p) - 1):
        p0, p1, p2, p3 = ext[j], ext[j + 1], ext[j + 2], ext[j + 3]
        seg = 0.5 * (
            2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
        )
        dense.append(seg)
        par.append(j + t[:, 0])
    dense.append(p[-1:])
    par.append(np.array([len(p) - 1.0]))
    dense = np.vstack(dense)
    par = np.concatenate(par)
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
    n = max(2, int(math.ceil(s[-1] / step)) + 1)
    sn = np.linspace(0.0, s[-1], n)
    pts = np.stack([np.interp(sn, s, dense[:, k]) for k in range(3)], axis=1)
    rad = np.interp(np.interp(sn, s, par), np.arange(len(p)), r)
    return pts, rad


def _tube(xs, ys, zs, pts, rad, pad: float = 8.0) -> np.ndarray:
    """Signed distance (mm) to a swept sphere along a polyline; +1e4 farther than ``pad`` from it.

    Two exact-enough ways: splat each segment (a round cone) into its own sub-box, or query a KD-tree of points
    sampled every ~0.7 mm along the axis; whichever the voxel counts say is cheaper.
    """
    xs = np.asarray(xs, np.float32)
    ys = np.asarray(ys, np.float32)
    zs = np.asarray(zs, np.float32)
    pts = np.asarray(pts, float)
    rad = np.asarray(rad, float)
    if len(pts) == 1:
        pts = np.vstack([pts, pts + 1e-3])
        rad = np.concatenate([rad, rad])
    shape = (len(xs), len(ys), len(zs))
    p0, p1, r0, r1 = pts[:-1], pts[1:], rad[:-1], rad[1:]
    lo = np.minimum(p0 - r0[:, None], p1 - r1[:, None]) - pad
    hi = np.maximum(p0 + r0[:, None], p1 + r1[:, None]) + pad
    idx = [
        (np.searchsorted(c, lo[:, k], "left"), np.searchsorted(c, hi[:, k], "right"))
        for k, c in enumerate((xs, ys, zs))
    ]
    counts = np.prod([np.maximum(i1 - i0, 0) for i0, i1 in idx], axis=0)
    live = np.nonzero(counts > 0)[0]
    out = np.full(shape, _BIG, np.float32)
    if len(live) == 0:
        return out
    splat_cost = len(live) * 60e-6 + float(counts[live].sum()) * 25e-9
    box = [(int(min(idx[k][0][live])), int(max(idx[k][1][live]))) for k in range(3)]
    n_box = int(np.prod([b - a for a, b in box]))
    if n_box * 0.8e-6 < splat_cost:
        from scipy.spatial import cKDTree

        seg = np.linalg.norm(p1 - p0, axis=1)
        k = np.maximum(np.ceil(seg / 0.7).astype(int), 1)
        t = np.concatenate([np.arange(n) / n for n in k])
        rep = np.repeat(np.arange(len(seg)), k)
        dense = p0[rep] + (p1 - p0)[rep] * t[:, None]
        drad = r0[rep] + (r1 - r0)[rep] * t
        dense = np.vstack([dense, pts[-1:]])
        drad = np.concatenate([drad, rad[-1:]])
        sub = tuple(slice(a, b) for a, b in box)
        g = np.stack(np.meshgrid(xs[sub[0]], ys[sub[1]], zs[sub[2]], indexing="ij"), axis=-1).reshape(-1, 3)
        dist, j = cKDTree(dense).query(g, distance_upper_bound=float(rad.max()) + pad)
        far = ~np.isfinite(dist)
        j[far] = 0
        val = np.where(far, _BIG, dist - drad[j]).astype(np.float32)
        out[sub] = val.reshape(out[sub].shape)
        return out
    for i in live:
        sl = tuple(slice(int(idx[k][0][i]), int(idx[k][1][i])) for k in range(3))
        a, b = pts[i], pts[i + 1]
        x, y, z = _grid3(xs[sl[0]], ys[sl[1]], zs[sl[2]], a)
        d = (b - a).astype(np.float32)
        l2 = max(float(d @ d), 1e-6)
        t = np.clip((x * d[0] + y * d[1] + z * d[2]) / np.float32(l2), 0.0, 1.0)
        dist = np.sqrt((x - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (z - t * d[2]) ** 2) - (r0[i] + t * (r1[i] - r0[i]))
        view = out[sl]
        np.minimum(view, dist, out=view)
    return out


_BSPLINE_NORM: float | None = None


def _bspline_weights(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i = np.floor(u).astype(np.int64)
    t = (u - i).astype(np.float32)
    w = np.stack(
        [(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6], axis=1
    )
    return w.astype(np.float32), i[:, None] + np.arange(-1, 3)[None, :]


class _Field:
    """Smooth random field of about unit standard deviation: i.i.d. normals on a lattice, cubic B-spline interpolated.

    Defined in millimetres over a box, so it is the same function whatever grid evaluates it.
    """

    def __init__(self, rng: np.random.Generator, lo, hi, step: float):
        global _BSPLINE_NORM
        if _BSPLINE_NORM is None:  # std of one axis of B-spline interpolated white noise, averaged over the offset
            w, _ = _bspline_weights(np.linspace(0, 1, 64, endpoint=False))
            _BSPLINE_NORM = float(np.sqrt(np.mean((w**2).sum(1)))) ** 3
        self.lo = np.asarray(lo, float) - 2 * step
        self.step = float(step)
        n = np.maximum(np.ceil((np.asarray(hi, float) + 2 * step - self.lo) / step).astype(int) + 1, 4)
        self.v = (rng.standard_normal(tuple(n)) / _BSPLINE_NORM).astype(np.float32)

    def __call__(self, xs, ys, zs) -> np.ndarray:
        a = self.v
        mats = []
        for axis, c in enumerate((xs, ys, zs)):
            w, idx = _bspline_weights((np.asarray(c, float) - self.lo[axis]) / self.step)
            idx = np.clip(idx, 0, a.shape[axis] - 1)
            k0, k1 = int(idx.min()), int(idx.max()) + 1
            a = a[(slice(None),) * axis + (slice(k0, k1),)]
            rows = np.repeat(np.arange(len(c)), 4)
            mats.append(sparse.csr_matrix((w.ravel(), (rows, (idx - k0).ravel())), shape=(len(c), k1 - k0)))
        return _contract(a, mats)


def _contract(a: np.ndarray, mats: list) -> np.ndarray:
    """Apply one sparse (n_out, n_in) matrix per axis to a 3D array: separable interpolation.

    Axes are contracted in order of growth (the one that enlarges the array least goes first).
    """
    order = sorted(range(3), key=lambda k: mats[k].shape[0] / max(mats[k].shape[1], 1))
    for k in order:
        b = np.moveaxis(a, k, 0)
        shp = b.shape
        b = mats[k] @ np.ascontiguousarray(b).reshape(shp[0], -1)
        a = np.moveaxis(np.asarray(b, np.float32).reshape((mats[k].shape[0],) + shp[1:]), 0, k)
    return np.ascontiguousarray(a, dtype=np.float32)


def _linear_matrix(src: np.ndarray, dst: np.ndarray):
    """Sparse linear-interpolation matrix from sorted, evenly spaced ``src`` points to ``dst`` points."""
    step = float(src[1] - src[0]) if len(src) > 1 else 1.0
    u = np.clip((np.asarray(dst, float) - src[0]) / step, 0, len(src) - 1)
    i0 = np.minimum(np.floor(u).astype(int), max(len(src) - 2, 0))
    t = (u - i0).astype(np.float32)
    rows = np.arange(len(dst))
    if len(src) == 1:
        return sparse.csr_matrix((np.ones(len(dst), np.float32), (rows, i0)), shape=(len(dst), 1))
    data = np.concatenate([1.0 - t, t])
    return sparse.csr_matrix(
        (data, (np.concatenate([rows, rows]), np.concatenate([i0, i0 + 1]))), shape=(len(dst), len(src))
    )


def _eval_coarse(fn: Callable, xs, ys, zs, step: float = 1.4) -> np.ndarray:
    """Evaluate ``fn`` on a lattice no finer than ``step`` mm and interpolate linearly to the (finer) grid.

    Signed distances of smooth shapes interpolate well, and this cuts the work on full-resolution grids 4-8 times.
    """
    axes = [np.asarray(c, np.float32) for c in (xs, ys, zs)]
    coarse, any_coarse = [], False
    for c in axes:
        d = float(c[1] - c[0]) if len(c) > 1 else step
        k = int(round(step / d)) if d > 0 else 1
        if k >= 2 and len(c) > 4:
            n = int(math.ceil((len(c) - 1) / k)) + 1
            coarse.append((c[0] + np.arange(n) * (k * d)).astype(np.float32))
            any_coarse = True
        else:
            coarse.append(c)
    if not any_coarse:
        return fn(*axes)
    v = fn(*coarse)
    return _contract(v, [_linear_matrix(cs, c) for cs, c in zip(coarse, axes, strict=False)])


def _child_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


# ------------------------------------------------------------------------------------------------------------- body


class _Body:
    """Torso outline (a super-ellipse per slice), subcutaneous fat and abdominal-wall muscle thickness."""

    def __init__(self, g: dict):
        self.g = g

    def half_axes(self, z):
        g = self.g
        z = np.asarray(z, np.float32)
        top = _smoothstep(g["z_R"] - 40.0, g["z_R"] + 60.0, z)
        pel = _smoothstep(g["z_crest"] + 20.0, g["z_crest"] - 100.0, z)
        a = g["a"] * (1.0 + g["a_top"] * top + g["a_pel"] * pel)
        b = g["b"] * (1.0 + g["b_top"] * top + 0.5 * g["a_pel"] * pel)
        return a.astype(np.float32), b.astype(np.float32)

    def polar(self, X, Y):
        """theta, r and the 2D pieces of the outline (broadcast (nx, ny, 1))."""
        g = self.g
        th = np.arctan2(Y, X)
        r = np.sqrt(X * X + Y * Y)
        c, s = np.abs(np.cos(th)), np.sin(th)
        p = g["p_post"] + (g["p_ant"] - g["p_post"]) * _smoothstep(-0.3, 0.3, s)
        wob = 1.0 + sum(amp * np.cos(k * th + ph) for k, amp, ph in g["wobble"])
        return th, r, c, s, p, wob

    def depth(self, xs, ys, zs, pol=None):
        """Distance (mm, along the ray from the body axis) inside the skin; negative outside."""
        X = np.asarray(xs, np.float32)[:, None, None]
        Y = np.asarray(ys, np.float32)[None, :, None]
        th, r, c, s, p, wob = pol if pol is not None else self.polar(X, Y)
        a, b = self.half_axes(zs)
        a = a[None, None, :]
        b = b[None, None, :]
        ss = np.abs(s)
        base = (np.maximum(c, 1e-6) / a) ** p + (np.maximum(ss, 1e-6) / b) ** p
        R = wob * base ** (-1.0 / p)
        return (R - r).astype(np.float32)

    def fat(self, th, s, X, zs):
        g = self.g
        z = np.asarray(zs, np.float32)[None, None, :]
        f = g["fat"] * np.where(s > 0, 0.85 + 0.35 * s, 0.85 + 0.3 * s)
        f = f * (1.0 + sum(amp * np.cos(k * th + ph) for k, amp, ph in g["fat_wobble"]))
        f = f * (1.0 + 0.3 * _smoothstep(0.0, -150.0, z) - 0.25 * _smoothstep(g["z_R"] - 30, g["z_R"] + 40, z))
        return np.maximum(f, 3.0).astype(np.float32)

    def muscle(self, th, s, X, zs):
        g = self.g
        c = np.abs(np.cos(th))
        m = g["muscle"] * (0.8 + 0.35 * c)
        m = m * (1.0 - 0.75 * np.exp(-((X / 6.0) ** 2)) * (s > 0.5))  # linea alba
        z = np.asarray(zs, np.float32)[None, None, :]
        m = m * (1.0 + 1.2 * _smoothstep(g["z_crest"], g["z_crest"] - 80.0, z) * c)  # gluteal muscles
        return m.astype(np.float32)

    def cavity(self, xs, ys, zs) -> np.ndarray:
        """Signed distance to the inside of the abdominal / thoracic wall (negative inside)."""
        X = np.asarray(xs, np.float32)[:, None, None]
        Y = np.asarray(ys, np.float32)[None, :, None]
        pol = self.polar(X, Y)
        th, _, _, s, _, _ = pol
        d = self.depth(xs, ys, zs, pol)
        return (self.fat(th, s, X, zs) + self.muscle(th, s, X, zs) + 1.0 - d).astype(np.float32)

    def diaphragm_z(self, xs, ys):
        """Height (mm) of the diaphragm over (x, y), broadcast (nx, ny, 1): two domes, gentle in front, deep recesses
        at the back and sides down to a floor (the costal attachments)."""
        g = self.g
        X = np.asarray(xs, np.float32)[:, None, None]
        Y = np.asarray(ys, np.float32)[None, :, None]
        k = g["dome_k"]
        dy = Y - g["dome_y"]
        dy2 = np.where(dy > 0, 0.45, 1.0) * dy * dy
        right = g["z_R"] - k * ((X - g["dome_xR"]) ** 2 + dy2)
        left = g["z_L"] - k * ((X - g["dome_xL"]) ** 2 + dy2)
        z = _smax(right, left, 25.0)
        central = g["z_R"] - 24.0 - 0.004 * X**2 - 0.006 * dy2
        z = _smax(z, central, 12.0)
        w = _smoothstep(g["dome_y"], g["dome_y"] - 70.0, Y)
        floor = g["dome_floor_ant"] + (g["dome_floor_post"] - g["dome_floor_ant"]) * w
        return _smax(z, floor, 12.0).astype(np.float32)

    def below_diaphragm(self, xs, ys, zs, t: float = 2.5) -> np.ndarray:
        zd = self.diaphragm_z(xs, ys)
        Z = np.asarray(zs, np.float32)[None, None, :]
        return (Z - (zd - t)) * np.float32(0.7)


# ------------------------------------------------------------------------------------------------------- organs


class _Organ:
    """A calibratable shape: ``core(xs, ys, zs, s)`` is a signed distance at scale s; clips and exclusions follow."""

    def __init__(
        self,
        name: str,
        core: Callable,
        bounds: Callable,
        *,
        field: _Field | None = None,
        amp: float = 0.0,
        fine: _Field | None = None,
        fine_amp: float = 0.0,
        clips: Sequence[Callable] = (),
        excl: Sequence[tuple[_Organ, float]] = (),
    ):
        self.name, self.core, self.bounds = name, core, bounds
        self.field, self.amp, self.fine, self.fine_amp = field, amp, fine, fine_amp
        self.clips, self.excl = list(clips), list(excl)
        self.s = 1.0

    def box(self):
        lo, hi = self.bounds(self.s)
        m = 2.0 + 2.5 * (self.amp + self.fine_amp)
        return np.asarray(lo) - m, np.asarray(hi) + m

    def shape_sdf(self, xs, ys, zs) -> np.ndarray:
        """The deformed shape alone (no clips, no exclusions): what other organs keep their distance from."""
        d = self.core(xs, ys, zs, self.s)
        if self.field is not None and self.amp:
            d = d + np.float32(self.amp) * self.field(xs, ys, zs)
        if self.fine is not None and self.fine_amp:
            d = d + np.float32(self.fine_amp) * self.fine(xs, ys, zs)
        return d

    def sdf(self, xs, ys, zs) -> np.ndarray:
        d = self.shape_sdf(xs, ys, zs)
        for clip in self.clips:
            d = np.maximum(d, clip(xs, ys, zs))
        for other, margin in self.excl:
            d = np.maximum(d, np.float32(margin) - other.shape_sdf(xs, ys, zs))
        return d.astype(np.float32, copy=False)

    def calibrate(self, target_ml: float, limit=None, lo: float = 0.6, hi: float = 1.4) -> float:
        """Scale the shape so that its volume on a lattice of ~1000 voxels per organ is ``target_ml`` (within 2 %).

        Only the core depends on the scale; clips, exclusions and deformation are evaluated once. ``limit``: a
        (lo, hi) box (the body) the lattice is restricted to.
        """
        step = float(np.clip((target_ml * 1000.0) ** (1 / 3) / 10.0, 3.0, 8.0))
        s0, self.s = self.s, hi
        box_lo, box_hi = self.box()
        self.s = s0
        if limit is not None:
            box_lo, box_hi = np.maximum(box_lo, limit[0]), np.minimum(box_hi, limit[1])
        axes = [np.arange(a, b + step, step, dtype=np.float32) for a, b in zip(box_lo, box_hi, strict=False)]
        extra = np.zeros([len(a) for a in axes], np.float32)
        if self.field is not None and self.amp:
            extra += np.float32(self.amp) * self.field(*axes)
        if self.fine is not None and self.fine_amp:
            extra += np.float32(self.fine_amp) * self.fine(*axes)
        static = np.full(extra.shape, -_BIG, np.float32)
        for clip in self.clips:
            static = np.maximum(static, clip(*axes))
        for other, margin in self.excl:
            static = np.maximum(static, np.float32(margin) - other.shape_sdf(*axes))
        for _ in range(6):
            d = np.maximum(self.core(*axes, self.s) + extra, static)
            v = float((d < 0).sum()) * step**3 / 1000.0
            if v <= 0:
                self.s = min(self.s * 1.3, hi)
                continue
            if abs(v / target_ml - 1.0) < 0.02:
                break
            self.s = float(np.clip(self.s * (target_ml / v) ** (1.0 / 2.6), lo, hi))
        return self.s


def _implicit(center, extent, fn):
    """Core for an implicit organ scaled about ``center``: fn(xs, ys, zs) in unscaled coordinates."""
    c = np.asarray(center, float)
    ext = np.asarray(extent, float)

    def core(xs, ys, zs, s):
        xs = c[0] + (np.asarray(xs, np.float32) - c[0]) / s
        ys = c[1] + (np.asarray(ys, np.float32) - c[1]) / s
        zs = c[2] + (np.asarray(zs, np.float32) - c[2]) / s
        return fn(xs, ys, zs) * np.float32(s)

    def bounds(s):
        return c - ext * s, c + ext * s

    return core, bounds


def _tube_core(ctrl, radii, step: float = 6.0, pad: float = 10.0):
    pts, rad = _spline(ctrl, radii, step)

    def core(xs, ys, zs, s):
        return _tube(xs, ys, zs, pts, rad * s, pad)

    def bounds(s):
        r = rad.max() * s + pad
        return pts.min(0) - r, pts.max(0) + r

    return core, bounds, pts, rad


# ------------------------------------------------------------------------------------------------------- canvas


class _Canvas:
    """The voxel grid in canonical (RAS) order with tissue and owner maps; painting is restricted to boxes."""

    def __init__(self, xs, ys, zs):
        self.xs = np.asarray(xs, np.float32)
        self.ys = np.asarray(ys, np.float32)
        self.zs = np.asarray(zs, np.float32)
        self.shape = (len(xs), len(ys), len(zs))
        self.tissue = np.zeros(self.shape, np.uint8)
        self.owner = np.zeros(self.shape, np.uint8)
        self.step = float(min(np.diff(self.xs[:2]).item(), np.diff(self.zs[:2]).item() if len(zs) > 1 else 1e9))

    def box(self, lo, hi):
        sl = []
        for c, a, b in zip((self.xs, self.ys, self.zs), lo, hi, strict=False):
            i0, i1 = int(np.searchsorted(c, a, "left")), int(np.searchsorted(c, b, "right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def coords(self, sl):
        return self.xs[sl[0]], self.ys[sl[1]], self.zs[sl[2]]

    def paint(self, sl, mask, tissue: int, owner: int | None = None):
        self.tissue[sl][mask] = tissue
        if owner is not None:
            self.owner[sl][mask] = owner

    def free(self, sl) -> np.ndarray:
        """Voxels an organ may take: visceral fat and small bowel."""
        return (self.tissue[sl] == T["visceral_fat"]) | (self.owner[sl] == _OWN["small_bowel"])

    def vessel_ok(self, sl) -> np.ndarray:
        return ~_VESSEL_PROTECTED[self.tissue[sl]]


# ------------------------------------------------------------------------------------------------------ sampling


def _u(rng, lo, hi) -> float:
    return float(rng.uniform(lo, hi))


def _sample_params(rng: np.random.Generator, cfg: dict) -> dict:
    """Every per-case number, drawn in a fixed order (overrides are applied afterwards, so they never shift it)."""
    g: dict[str, Any] = {}
    h = _u(rng, 0, 1)
    g["habitus"] = h
    g["a"] = float(np.clip(140 + 45 * h + rng.normal(0, 6), 128, 195))
    g["b"] = float(np.clip(100 + 38 * h + rng.normal(0, 6), 88, 145))
    g["b"] = min(g["b"], 0.85 * g["a"])
    g["fat"] = float(np.clip(6 + 30 * h * _u(rng, 0.7, 1.3), 4, 48))
    g["muscle"] = _u(rng, 8, 13)
    g["p_ant"] = _u(rng, 1.9, 2.25)
    g["p_post"] = _u(rng, 2.5, 3.3)
    g["wobble"] = [(k, _u(rng, 0, 0.015), _u(rng, 0, 2 * math.pi)) for k in (2, 3, 4)]
    g["fat_wobble"] = [(k, _u(rng, 0, 0.12), _u(rng, 0, 2 * math.pi)) for k in (1, 2, 3)]
    g["a_top"] = _u(rng, -0.08, 0.0)
    g["b_top"] = _u(rng, -0.02, 0.05)
    g["a_pel"] = _u(rng, 0.0, 0.08)
    hz = _u(rng, 0.92, 1.08)
    g["hz"] = hz
    g["z_P"] = _u(rng, -12, 8)  # pancreas body level (about L1/L2)
    g["z_R"] = g["z_P"] + hz * _u(rng, 105, 130)  # right dome of the diaphragm
    g["z_L"] = g["z_R"] - _u(rng, 8, 25)
    g["z_L1"] = g["z_P"] + _u(rng, 5, 18)
    g["z_crest"] = g["z_L1"] - hz * _u(rng, 95, 120)  # iliac crest (about L4)
    g["dome_k"] = _u(rng, 0.011, 0.016)
    g["x_spine"] = _u(rng, -4, 4)
    # organ jitters (mm) and shapes
    for key in ("liver", "spleen", "kidney_R", "kidney_L", "stomach", "gallbladder", "pancreas", "colon"):
        g[f"d_{key}"] = [float(v) for v in rng.normal(0, [6, 5, 6])]
    g["liver_left"] = _u(rng, 0.7, 1.1)  # left-lobe size
    g["liver_tip"] = _u(rng, 0, 35)  # how far the right lobe reaches down
    g["spleen_tilt"] = _u(rng, -0.3, 0.3)
    g["kidney_tilt"] = _u(rng, 0.15, 0.4)
    g["stomach_air"] = _u(rng, 0.0, 1.0)
    g["stomach_food"] = bool(rng.uniform() < 0.3)
    g["aorta_r"] = _u(rng, 9.5, 12.0)
    g["ivc_r"] = _u(rng, 9.0, 12.0)
    g["pv_r"] = _u(rng, 6.0, 7.5)
    g["bowel_gas"] = _u(rng, 0.1, 0.6)
    g["bowel_density"] = _u(rng, 0.35, 0.65)
    g["table_gap"] = _u(rng, 4, 25)
    g["table_radius"] = _u(rng, 400, 900)
    g["table_thick"] = _u(rng, 25, 45)
    g["heart_x"] = _u(rng, -25, 0)
    # organ volumes grow with the body (about with its cross-section), within the ranges of real CTs
    q = float(np.clip((g["a"] * g["b"] / (165.0 * 120.0)) ** 0.75, 0.8, 1.25))
    targets = {}
    for k, (lo_v, hi_v, lo_c, hi_c, scaled) in _TARGET_ML.items():
        targets[k] = float(np.clip(_u(rng, lo_v, hi_v) * (q if scaled else 1.0), lo_c, hi_c))
    targets["kidney_R"] = targets["kidney"] * _u(rng, 0.9, 1.05)
    targets["kidney_L"] = targets.pop("kidney") * _u(rng, 0.95, 1.1)
    g["targets_ml"] = targets
    # acquisition
    phase = str(rng.choice(list(PHASES), p=list(PHASES.values())))
    hu = {}
    for name in _TISSUE_NAMES:
        spec = TISSUE_HU[name]
        per_phase = {p: spec[p] if isinstance(spec, dict) else spec for p in PHASES}
        hu[name] = {p: round(_u(rng, *per_phase[p]), 1) for p in PHASES}  # one draw per phase: switching phase
    g["hu_all"] = hu  # keeps everything else the same
    acq = {
        "phase": phase,
        "orientation": str(rng.choice(ORIENTATIONS)),
        "noise_std": _u(rng, 6.0, 20.0),
        "noise_corr_mm": _u(rng, 0.5, 0.9),
        "psf_mm": _u(rng, 0.35, 0.7),
        "fov_fill": _u(rng, 1.03, 1.2),
        "fov_dx": _u(rng, -10, 10),
        "slice_spacing": float(rng.choice(cfg["slice_spacing"])),
        "z_extent": _u(rng, *cfg["z_extent"]),
        "top_margin": _u(rng, 15, 60),
        "world_offset": [round(_u(rng, -20, 20), 2), round(_u(rng, -200, -100), 2), round(_u(rng, -900, -300), 2)],
        "recon_circle": False,
    }
    return {"anatomy": g, "acquisition": acq}


# ------------------------------------------------------------------------------------------------------ anatomy


class _Anatomy:
    """Builds every structure from the sampled numbers; ``render`` paints them on a canvas."""

    def __init__(self, seed: int, g: dict):
        self.seed, self.g = seed, g
        self.body = _Body(g)
        a, b, fat, mus = g["a"], g["b"], g["fat"], g["muscle"]
        self.Wc = a - 0.85 * fat - 1.15 * mus  # cavity half-width
        self.Dc = b - 1.2 * fat - 0.8 * mus  # cavity front (y)
        self.sx = self.Wc / 135.0
        self.sy = self.Dc / 85.0
        self.fat_post = max(0.55 * fat, 3.0)
        self.y_c = -b + self.fat_post + 45.0  # spinal canal centre
        self.y_vb = self.y_c + 27.0  # vertebral body centre
        self.y_A = self.y_vb + 18.0 + g["aorta_r"]  # aorta centre
        self.x_s = g["x_spine"]
        g["dome_xR"], g["dome_xL"], g["dome_y"] = 62.0 * self.sx, -62.0 * self.sx, self.y_vb + 45.0
        g["dome_floor_ant"] = g["z_R"] - 70.0
        g["dome_floor_post"] = g["z_L1"] + 15.0
        self._build()

    # -- helpers
    def rng(self, name):
        return _child_rng(self.seed, name)

    def _organ_field(self, name, lo, hi, step):
        return _Field(self.rng(name), np.asarray(lo) - 40, np.asarray(hi) + 40, step)

    def y_vb_at(self, z):
        """Vertebral body centre y at height z (lumbar lordosis brings L3/L4 forward)."""
        g = self.g
        return self.y_vb + 7.0 * np.exp(-(((np.asarray(z, float) - (g["z_L1"] - 75.0)) / 70.0) ** 2)) - 3.0

    def back_sdf(self, xs, ys, zs, spine: bool = True) -> np.ndarray:
        """Approximate signed distance to the back muscles (erector spinae, psoas, quadratus lumborum) and, with
        ``spine``, a keep-out around the vertebral column. Organs are clipped by it; the muscles are painted from it."""
        g = self.g
        X = np.abs(np.asarray(xs, np.float32) - np.float32(self.x_s))[:, None, None]
        Y = np.asarray(ys, np.float32)[None, :, None]
        Z = np.asarray(zs, np.float32)[None, None, :]
        zL1 = g["z_L1"]
        grow = 1.0 + 0.15 * _smoothstep(zL1 + 40, zL1 - 60, Z)
        sa, sb, cy = 54.0 * grow, 27.0, self.y_c - 16.0
        rho = ((X / sa) ** 2.4 + (np.abs(Y - cy) / sb) ** 2.4) ** (1 / 2.4)
        d = (rho - 1.0) * sb
        zT12 = zL1 + 28.0
        r_ps = 3.0 + 19.0 * _smoothstep(zT12, zL1 - 110.0, Z)
        ps_x = 24.0 + 0.9 * r_ps
        ps_y = self.y_vb_at(zs).astype(np.float32)[None, None, :] + 2.0 + 0.25 * r_ps
        d_ps = np.sqrt(((X - ps_x) / 1.1) ** 2 + (Y - ps_y) ** 2) - r_ps
        d = np.minimum(d, np.where(Z < zT12, d_ps, _BIG))
        rho_q = np.sqrt(((X - 58.0 * self.sx) / 20.0) ** 2 + ((Y - (self.y_vb - 24.0)) / 10.0) ** 2)
        ql_on = (Z < zL1 + 10.0) & (Z > g["z_crest"] - 10.0)
        d = np.minimum(d, np.where(ql_on, (rho_q - 1.0) * 10.0, _BIG))
        if spine:
            d_sp = (np.sqrt((X / 30.0) ** 2 + ((Y - (self.y_vb - 12.0)) / 44.0) ** 2) - 1.0) * 30.0
            d = np.minimum(d, d_sp)
        return d.astype(np.float32)

    def _tube_organ(self, name, pts, rad, pad=8.0) -> _Organ:
        def core(xs, ys, zs, s):
            return _tube(xs, ys, zs, pts, rad * s, pad)

        def bounds(s):
            r = rad.max() * s + pad
            return pts.min(0) - r, pts.max(0) + r

        return _Organ(name, core, bounds)

    # -- build
    def _build(self):
        g, sx, sy = self.g, self.sx, self.sy
        yA, yvb, zP, zR, zL = self.y_A, self.y_vb, g["z_P"], g["z_R"], g["z_L"]
        Wc, Dc = self.Wc, self.Dc
        body = self.body
        cav = body.cavity

        def below(xs, ys, zs):
            return body.below_diaphragm(xs, ys, zs, 3.0)

        def back(xs, ys, zs):
            return 2.0 - self.back_sdf(xs, ys, zs)

        # ---- positions -------------------------------------------------------------------------------------------
        kid = {}
        for side, sgn in (("R", 1.0), ("L", -1.0)):
            d = np.asarray(g[f"d_kidney_{side}"])
            zc = (zP - 20.0 if side == "R" else zP - 4.0) + d[2]
            c = np.array([sgn * 76.0 * sx + 0.6 * d[0], yvb + 8.0 + 0.4 * d[1], zc])
            axis = np.array([-sgn * g["kidney_tilt"], -0.3, 1.0])  # upper pole medial and posterior
            rot = _frame(axis, [0.0, 1.0, 0.0])
            hd = _unit([-sgn * 1.0, 0.9, 0.0])  # the hilum faces anteromedially
            kid[side] = {"c": c, "rot": rot, "hd": hd, "hilum": c + hd * 24.0, "sgn": sgn}
        self.kidney_info = kid
        d = np.asarray(g["d_spleen"])
        c_sp = np.array([-(Wc - 42.0) + 0.6 * d[0], yvb + 12.0 + d[1], zL - 52.0 + d[2]])
        rot_sp = _frame([-0.25, 0.55 + g["spleen_tilt"], -0.8], [-0.8, -0.5, 0.0])  # v ~ lateral-posterior normal
        inward = -rot_sp[:, 1]
        self.spleen_hilum = c_sp + inward * 20.0
        sh = self.spleen_hilum
        d = np.asarray(g["d_pancreas"])
        self.pancreas_ctrl = np.array(
            [
                [38 * sx, yA + 30.0, zP - 30.0],
                [33 * sx, yA + 38.0, zP - 12.0],
                [6 * sx, yA + 46.0, zP + 0.0],
                [-24 * sx, yA + 45.0, zP + 8.0],
                [-50 * sx, yA + 36.0, zP + 14.0],
                [0.6 * sh[0] - 30 * sx, 0.5 * (yA + 20.0 + sh[1]), 0.5 * (zP + 20.0 + sh[2])],
                [sh[0] + 14.0, sh[1] + 8.0, sh[2] - 4.0],
            ]
        ) + d * np.array([0.8, 0.5, 0.6])
        self.porta = np.array([40.0 * sx, yA + 40.0 * sy, zP + 38.0])
        d = np.asarray(g["d_stomach"])
        st_ctrl = np.array(
            [
                [-52 * sx, yvb + 42.0, zL - 34.0],
                [-68 * sx, yA + 35.0 * sy, zL - 60.0],
                [-64 * sx, yA + 60.0 * sy, zP + 44.0],
                [-40 * sx, yA + 74.0 * sy, zP + 22.0],
                [-8 * sx, yA + 76.0 * sy, zP + 16.0],
                [18 * sx, yA + 64.0 * sy, zP + 20.0],
                [34 * sx, yA + 50.0 * sy, zP + 24.0],
            ]
        ) + d * np.array([1.0, 0.6, 0.6])
        self.pylorus = st_ctrl[-1]
        self.ge_junction = st_ctrl[0] + np.array([18.0, -5.0, 12.0])
        self._build_vessels()
        pv_excl = [self._tube_organ("portal", p, r) for p, r in self.vessels["portal_vein"]]
        big_vessels = [
            self._tube_organ(k, p, r) for k in ("inferior_vena_cava", "artery") for p, r in self.vessels[k]
        ] + pv_excl

        # ---- organs (each clipped to the cavity, and excluding what it must not overlap) ---------------------------
        self.kidneys = {}
        for side, k in kid.items():
            c, rot, hd = k["c"], k["rot"], k["hd"]

            def fn(xs, ys, zs, c=c, rot=rot, hd=hd):
                e = _ellipsoid(xs, ys, zs, c, [28.0, 24.0, 57.0], rot)
                notch = _ellipsoid(xs, ys, zs, c + hd * 30.0, [13.0, 13.0, 22.0], rot)
                sinus = _ellipsoid(xs, ys, zs, c + hd * 13.0, [11.0, 10.0, 30.0], rot)
                return _smax(_smax(e, -notch, 4.0), -sinus, 2.0)

            core, bounds = _implicit(c, [64, 64, 64], fn)
            f = self._organ_field(f"kidney_{side}", c - 70, c + 70, 30.0)
            name = "kidney_right" if side == "R" else "kidney_left"
            self.kidneys[side] = _Organ(name, core, bounds, field=f, amp=2.5, clips=[cav, back])
        core, bounds, _, _ = _tube_core(self.pancreas_ctrl, [17, 15, 10.5, 11, 10, 9, 7.5], step=5.0)
        lo, hi = bounds(1.4)
        self.pancreas = _Organ(
            "pancreas",
            core,
            bounds,
            field=self._organ_field("pancreas", lo, hi, 25.0),
            amp=2.5,
            fine=self._organ_field("pancreas_lobules", lo, hi, 6.0),
            fine_amp=1.2,
            clips=[cav, back],
            excl=[(v, 1.0) for v in pv_excl],
        )
        core, bounds, _, _ = _tube_core(st_ctrl, [33, 31, 28, 23, 19, 14, 8])
        lo, hi = bounds(1.5)
        self.stomach = _Organ(
            "stomach",
            core,
            bounds,
            field=self._organ_field("stomach", lo, hi, 35.0),
            amp=4.0,
            clips=[cav, below, back],
            excl=[(self.pancreas, 2.5)],
        )
        d = np.asarray(g["d_gallbladder"])
        z_edge = self._liver_edge_z(50.0 * sx)
        fundus = np.array([52.0 * sx + d[0], Dc - 28.0 + 0.5 * d[1], z_edge + 2.0 + 0.5 * d[2]])
        neck = np.array([36.0 * sx, yA + 48.0 * sy, fundus[2] + 48.0])
        mid = fundus + 0.45 * (neck - fundus) + np.array([4.0, -4.0, -6.0])
        core, bounds, _, _ = _tube_core([fundus, mid, neck + (fundus - neck) * 0.12, neck], [16, 15, 10, 5], step=4.0)
        lo, hi = bounds(1.4)
        self.gallbladder = _Organ(
            "gallbladder",
            core,
            bounds,
            field=self._organ_field("gallbladder", lo, hi, 25.0),
            amp=2.0,
            clips=[cav],
            excl=[(self.pancreas, 2.0)],
        )

        def fn_spleen(xs, ys, zs, c=c_sp, rot=rot_sp, inward=inward):
            e = _ellipsoid(xs, ys, zs, c, [40.0, 24.0, 62.0], rot)
            hollow = _ellipsoid(xs, ys, zs, c + inward * 36.0, [36.0, 22.0, 50.0], rot)
            return _smax(e, -hollow, 6.0)

        core, bounds = _implicit(c_sp, [70, 70, 70], fn_spleen)
        self.spleen = _Organ(
            "spleen",
            core,
            bounds,
            field=self._organ_field("spleen", c_sp - 80, c_sp + 80, 30.0),
            amp=4.0,
            clips=[cav, below, back],
            excl=[(self.stomach, 4.0), (self.kidneys["L"], 5.0), (self.pancreas, 2.0)],
        )
        d = np.asarray(g["d_liver"])
        cR = np.array([72.0 * sx + d[0], 0.5 * (yvb + Dc) + 8.0 + d[1], zR - 72.0 + d[2]])
        cL = np.array([-22.0 * sx + d[0], Dc - 36.0 + 0.5 * d[1], zR - 58.0 + d[2]])
        ll = g["liver_left"]
        rotL = _frame([0.0, 0.15, 1.0], [0.0, 1.0, 0.0])
        tip = g["liver_tip"]

        def fn_liver(xs, ys, zs, cR=cR, cL=cL, ll=ll, rotL=rotL, tip=tip):
            right = _ellipsoid(xs, ys, zs, cR, [92.0 * sx, 88.0 * sy, 95.0], None)
            left = _ellipsoid(xs, ys, zs, cL, [82.0 * sx * ll, 38.0, 46.0 * (0.8 + 0.2 * ll)], rotL)
            d0 = _smin(right, left, 25.0)
            # inferior (visceral) surface slants up from the right lateral tip to the left lobe
            # (curved: a plane would leave straight edges in axial slices)
            p = np.array([cR[0] + 60.0 * sx, cR[1], zP - 48.0 - tip])
            cut = _plane(xs, ys, zs, p, [0.42, 0.12, -1.0])
            yy = (np.asarray(ys, np.float32) - np.float32(cR[1] + 10.0))[None, :, None]
            xx = (np.asarray(xs, np.float32) - np.float32(p[0]))[:, None, None]
            cut = cut - np.float32(0.006) * yy**2 + np.float32(0.0012) * xx**2
            return _smax(d0, cut, 10.0)

        core, bounds = _implicit((cR + cL) / 2, [190, 130, 130], fn_liver)
        lo, hi = bounds(1.4)
        self.liver = _Organ(
            "liver",
            core,
            bounds,
            field=self._organ_field("liver", lo, hi, 32.0),
            amp=8.0,
            clips=[cav, below, back],
            excl=[(self.kidneys["R"], 6.0), (self.stomach, 3.0), (self.gallbladder, 1.5), (self.pancreas, 4.0)]
            + [(v, -0.5) for v in big_vessels],  # vessels painted later carve the liver: calibrate without them
        )
        # calibrate in painting order (each against what it excludes)
        tg = g["targets_ml"]
        limit = (
            np.array([-g["a"] * 1.1, -g["b"] * 1.1, g["z_crest"] - 100.0]),
            np.array([g["a"] * 1.1, g["b"] * 1.1, zR + 10.0]),
        )
        for org, key in (
            (self.kidneys["R"], "kidney_R"),
            (self.kidneys["L"], "kidney_L"),
            (self.pancreas, "pancreas"),
            (self.stomach, "stomach"),
            (self.gallbladder, "gallbladder"),
            (self.spleen, "spleen"),
            (self.liver, "liver"),
        ):
            org.calibrate(tg[key], limit=limit)

    def _liver_edge_z(self, x):
        g = self.g
        cRx = 72.0 * self.sx
        # where the inferior plane of the liver crosses x (plane through (cRx + 60 sx, ., zP - 48 - tip))
        return g["z_P"] - 48.0 - g["liver_tip"] + 0.42 * ((cRx + 60.0 * self.sx) - x)

    def _build_vessels(self):
        g, sx, sy = self.g, self.sx, self.sy
        yA, yvb, zP, zR = self.y_A, self.y_vb, g["z_P"], g["z_R"]
        ra, ri, rp = g["aorta_r"], g["ivc_r"], g["pv_r"]
        xa = self.x_s - 14.0
        z_bif = g["z_crest"] + 8.0
        top = zR + 250.0

        def ya(z):  # aortic centre y following the lordosis
            return float(self.y_vb_at(z)) - yvb + yA

        V: dict[str, list] = {
            "artery": [],
            "portal_vein": [],
            "inferior_vena_cava": [],
            "caval_extra": [],
            "hepatic_vein": [],
        }
        # aorta: left-anterior of the spine; the descending thoracic part more posterior and lateral
        aorta = [
            [xa - 12.0, yA - 14.0, top],
            [xa - 9.0, yA - 8.0, zR + 40.0],
            [xa - 4.0, yA - 2.0, zR - 40.0],
            [xa, yA, zP + 10.0],
            [xa + 2.0, ya(zP - 60.0), zP - 60.0],
            [xa + 6.0, ya(z_bif), z_bif],
        ]
        V["artery"].append((aorta, [ra + 2.0, ra + 1.5, ra + 0.5, ra, ra - 0.8, ra - 1.5], 8.0))
        for sgn in (1.0, -1.0):  # common / external iliac arteries
            V["artery"].append(
                (
                    [
                        [xa + 6.0, ya(z_bif), z_bif + 2.0],
                        [xa + 6.0 + sgn * 30.0, ya(z_bif) - 2.0, z_bif - 50.0],
                        [sgn * 60.0 * sx, ya(z_bif) + 4.0, z_bif - 130.0],
                    ],
                    [ra * 0.6, ra * 0.55, ra * 0.5],
                    8.0,
                )
            )
        # celiac trunk -> common hepatic and (tortuous) splenic arteries; SMA; renal arteries
        zc = zP + 26.0
        cel = [xa, yA + ra - 3.0, zc]
        cel_end = [xa + 1.0, yA + ra + 14.0, zc + 2.0]
        V["artery"].append(([cel, cel_end], [3.6, 3.4], 4.0))
        V["artery"].append(
            ([cel_end, [15 * sx, yA + 32.0, zc + 2.0], list(self.porta + [0.0, 2.0, 4.0])], [3.2, 3.0, 2.6], 4.0)
        )
        sh = self.spleen_hilum
        wig = self.rng("splenic_artery").normal(0, 5.0, (4, 3))
        spl = [cel_end] + [
            list(np.array(cel_end) + (sh - np.array(cel_end)) * t + np.array([0, 4.0, 8.0]) + wig[i])
            for i, t in enumerate((0.25, 0.5, 0.72, 0.9))
        ]
        V["artery"].append((spl + [list(sh)], [3.0, 3.0, 2.9, 2.8, 2.6, 2.4], 3.0))
        zs_ = zc - 14.0
        sma = [
            [xa, yA + ra - 3.0, zs_],
            [xa + 3.0, yA + ra + 10.0, zs_ - 12.0],
            [xa + 6.0, yA + ra + 22.0, zP - 30.0],
            [xa + 8.0, yA + ra + 28.0, zP - 80.0],
            [xa + 12.0, yA + ra + 30.0, zP - 130.0],
        ]
        V["artery"].append((sma, [4.2, 4.0, 3.6, 3.2, 2.6], 5.0))
        zr = zP - 6.0
        for side in ("R", "L"):
            hil = self.kidney_info[side]["hilum"]
            via = [0.5 * (xa + hil[0]), yA - 6.0 if side == "R" else yA, zr - 2.0]
            V["artery"].append(([[xa, yA, zr], via, list(hil)], [3.2, 3.0, 2.8], 5.0))
        # inferior vena cava: right of the aorta, then forward into the bare area of the liver, up to the right atrium
        xi = self.x_s + 22.0
        ivc = [
            [xi + 2.0, ya(z_bif - 15.0) - 2.0, z_bif - 15.0],
            [xi, ya(zP - 50.0) - 1.0, zP - 50.0],
            [xi, yA + 2.0, zP + 10.0],
            [xi + 4.0, yA + 14.0, zR - 55.0],
            [xi + 2.0, yA + 22.0, zR - 5.0],
            [xi - 6.0, yA + 38.0, zR + 30.0],
        ]
        V["inferior_vena_cava"].append((ivc, [ri * 0.9, ri, ri, ri * 1.1, ri * 1.15, ri * 1.3], 8.0))
        for sgn in (1.0, -1.0):  # common iliac veins, behind and medial to the arteries
            V["caval_extra"].append(
                (
                    [
                        [xi + 2.0, ivc[0][1], z_bif - 12.0],
                        [xi + 2.0 + sgn * 30.0 - (0 if sgn > 0 else 20.0), ivc[0][1] - 6.0, z_bif - 60.0],
                        [sgn * 58.0 * sx, ivc[0][1] - 4.0, z_bif - 140.0],
                    ],
                    [ri * 0.7, ri * 0.62, ri * 0.55],
                    8.0,
                )
            )
        for side in ("R", "L"):  # renal veins; the left one crosses in front of the aorta below the SMA
            hil = self.kidney_info[side]["hilum"]
            if side == "L":
                path = [
                    list(hil + [0, 4.0, -2.0]),
                    [xa - 16.0, yA + ra + 4.0, zr - 4.0],
                    [xa, yA + ra + 6.0, zr - 6.0],
                    [xi, yA + 2.0, zr - 8.0],
                ]
                rr = [5.0, 5.0, 4.2, 5.5]
            else:
                path = [list(hil + [0, 4.0, -2.0]), [xi, yA + 2.0, zr - 6.0]]
                rr = [5.0, 5.5]
            V["caval_extra"].append((path, rr, 4.0))
        # portal system: SMV up to the confluence behind the pancreatic neck, portal vein to the porta hepatis,
        # right and left branches; splenic vein along the back of the pancreas from the splenic hilum
        conf = np.array([8.0 * sx, yA + 25.0, zP - 2.0])
        porta = self.porta
        V["portal_vein"].append(
            (
                [[14.0 * sx, yA + ra + 32.0, zP - 90.0], [12.0 * sx, yA + ra + 26.0, zP - 40.0], list(conf)],
                [rp * 0.8, rp * 0.85, rp],
                6.0,
            )
        )
        V["portal_vein"].append(
            ([list(conf), list(0.5 * (conf + porta) + [0, -2.0, 0]), list(porta)], [rp, rp, rp], 5.0)
        )
        V["portal_vein"].append(
            (
                [list(porta), list(porta + [35.0 * sx, -6.0, 3.0]), list(porta + [62.0 * sx, -12.0, 6.0])],
                [rp * 0.8, rp * 0.7, rp * 0.55],
                4.0,
            )
        )
        V["portal_vein"].append(
            (
                [list(porta), list(porta + [-25.0 * sx, 12.0, 8.0]), list(porta + [-50.0 * sx, 30.0 * sy, 12.0])],
                [rp * 0.75, rp * 0.65, rp * 0.5],
                4.0,
            )
        )
        pc = self.pancreas_ctrl
        spv = [
            list(sh + [8.0, 2.0, -2.0]),
            [pc[5][0], pc[5][1] - 10.0, pc[5][2] - 2.0],
            [pc[4][0], pc[4][1] - 11.0, pc[4][2] - 2.0],
            [pc[3][0], pc[3][1] - 13.0, pc[3][2] - 3.0],
            list(conf + [-6.0, 0.0, 0.0]),
        ]
        V["portal_vein"].append((spv, [4.5, 4.6, 4.8, 5.0, 5.2], 5.0))
        # hepatic veins from the IVC below the dome, fanning out into the liver (they belong to the liver)
        hv0 = np.array([xi + 3.0, yA + 22.0, zR - 15.0])
        for end in (
            [95.0 * sx, yA + 5.0, zR - 60.0],
            [45.0 * sx, yA + 60.0 * sy, zR - 70.0],
            [-20.0 * sx, yA + 55.0 * sy, zR - 45.0],
        ):
            V["hepatic_vein"].append(([list(hv0), list(0.5 * (hv0 + end) + [0, 0, 8.0]), end], [5.5, 4.0, 2.2], 4.0))
        self.vessels = {k: [_spline(p, r, st) for p, r, st in v] for k, v in V.items()}
        # ---- oesophagus (posterior mediastinum -> hiatus -> cardia)
        ge = self.ge_junction
        self.esophagus = _spline(
            [[xa + 12.0, yA + 2.0, top], [xa + 8.0, yA + 10.0, zR + 30.0], [xa + 2.0, yA + 16.0, zR - 10.0], list(ge)],
            [8.0, 8.0, 8.5, 9.0],
            6.0,
        )
        # ---- duodenum (C-loop around the pancreatic head: D1 from the pylorus, D2 down, D3 across, D4 up)
        py = self.pylorus
        self.duodenum = _spline(
            [
                list(py),
                [py[0] + 14.0 * sx, yA + 34.0, py[2] - 2.0],
                [62.0 * sx, yA + 24.0, zP + 6.0],
                [64.0 * sx, yA + 22.0, zP - 38.0],
                [36.0 * sx, yA + 22.0, zP - 58.0],
                [xa + 10.0, yA + ra + 12.0, zP - 62.0],
                [-26.0 * sx, yA + 26.0, zP - 46.0],
                [-32.0 * sx, yA + 34.0, zP - 24.0],
            ],
            [9.0, 12.0, 13.0, 13.0, 12.0, 11.0, 11.0, 11.0],
            6.0,
        )
        # ---- colon (ascending right, hepatic flexure, transverse sagging in front, splenic flexure high, descending
        # left, sigmoid)
        d = np.asarray(g["d_colon"])
        Dc, Wc = self.Dc, self.Wc
        ctrl = np.array(
            [
                [(Wc - 45.0), yvb + 35.0, g["z_crest"] - 40.0],
                [(Wc - 35.0), yvb + 22.0, zP - 70.0],
                [(Wc - 45.0), yA + 40.0, zP - 28.0],
                [30.0 * sx, Dc - 28.0, zP - 55.0],
                [-40.0 * sx, Dc - 30.0, zP - 45.0],
                [-(Wc - 38.0), yvb + 35.0, zP + 30.0],
                [-(Wc - 30.0), yvb + 10.0, zP - 40.0],
                [-(Wc - 35.0), yvb + 15.0, g["z_crest"] - 30.0],
                [-45.0 * sx, yA + 35.0, g["z_crest"] - 90.0],
            ]
        ) + d * np.array([0.5, 0.5, 1.0])
        pts, rad = _spline(ctrl, [28, 24, 22, 22, 22, 22, 20, 20, 18], 6.0)
        s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        rad = rad * (1.0 + 0.12 * np.cos(2 * np.pi * s / 28.0))  # haustra
        self.colon = (pts, rad)

    # -------------------------------------------------------------------------------------------------- painting
    def render(self, cv: _Canvas) -> None:
        self._paint_table(cv)
        self._paint_body(cv)
        self._paint_back_muscles(cv)
        self._paint_spine(cv)
        self._paint_ribs(cv)
        self._paint_pelvis(cv)
        self._paint_thorax(cv)
        self._paint_small_bowel(cv)
        self._paint_organs(cv)
        self._paint_gi_tubes(cv)
        self._paint_vessels(cv)

    # ---- table: a curved carbon-fibre plate (two thin dense skins around foam) below the body, separated by air
    def _paint_table(self, cv):
        g = self.g
        wob = 1.0 + sum(amp * math.cos(-k * math.pi / 2 + ph) for k, amp, ph in g["wobble"])
        y_top = -g["b"] * wob - g["table_gap"]
        R, th = g["table_radius"], g["table_thick"]
        skin = max(2.5, 1.5 * float(cv.ys[1] - cv.ys[0]))
        X = cv.xs[:, None].astype(np.float64)
        Y = cv.ys[None, :].astype(np.float64)
        surf = y_top + (R - np.sqrt(np.maximum(R * R - X * X, 0.0)))  # curved up at the sides
        depth = surf - Y  # > 0 below the top surface
        inside = (np.abs(X) < 235.0) & (depth > 0) & (depth < th)
        shell = inside & ((depth < skin) | (depth > th - skin) | (np.abs(X) > 235.0 - skin))
        m2 = np.where(shell, T["table_shell"], np.where(inside, T["table_foam"], 0)).astype(np.uint8)
        cv.tissue[:] = m2[:, :, None]

    # ---- skin, fat, abdominal wall, cavity
    def _paint_body(self, cv):
        body = self.body
        X = cv.xs[:, None, None]
        Y = cv.ys[None, :, None]
        pol = body.polar(X, Y)
        th, _, _, s, _, _ = pol
        chunk = max(1, int(4e6 // (cv.shape[0] * cv.shape[1])))
        for k0 in range(0, cv.shape[2], chunk):
            zs = cv.zs[k0 : k0 + chunk]
            d = body.depth(cv.xs, cv.ys, zs, pol)
            f = body.fat(th, s, X, zs)
            m = f + body.muscle(th, s, X, zs)
            t = cv.tissue[:, :, k0 : k0 + chunk]
            t[d >= 0] = T["skin"]
            t[d >= 2.0] = T["fat"]
            t[d >= f] = T["muscle"]
            t[d >= m] = T["visceral_fat"]

    # ---- erector spinae, psoas, quadratus lumborum
    def _paint_back_muscles(self, cv):
        sl = cv.box([self.x_s - 130, self.y_c - 60, -1e4], [self.x_s + 130, self.y_vb + 40, 1e4])
        if sl is None:
            return
        xs, ys, zs = cv.coords(sl)
        m = self.back_sdf(xs, ys, zs, spine=False) < 0
        m &= self.body.depth(xs, ys, zs) > self.fat_post + 1.0
        t = cv.tissue[sl]
        ok = (t == T["visceral_fat"]) | (t == T["muscle"]) | (t == T["fat"])
        t[m & ok] = T["muscle"]

    # ---- vertebrae, discs, canal, posterior elements
    def _levels(self):
        """(name, z centre, body height, disc below) from T6 down to S1, with L1 at z_L1."""
        g = self.g
        hz = g["hz"]
        names = ["T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
        heights = [h * hz for h in (21, 21, 22, 22, 23, 24, 25, 26, 27, 28, 28, 27, 30)]
        discs = [d * hz for d in (5, 5, 5, 6, 6, 7, 8, 9, 10, 10, 10, 10, 0)]
        i1 = names.index("L1")
        zc = [0.0] * len(names)
        zc[i1] = g["z_L1"]
        for i in range(i1 - 1, -1, -1):
            zc[i] = zc[i + 1] + heights[i + 1] / 2 + discs[i] + heights[i] / 2
        for i in range(i1 + 1, len(names)):
            zc[i] = zc[i - 1] - heights[i - 1] / 2 - discs[i - 1] - heights[i] / 2
        return list(zip(names, zc, heights, discs, strict=False))

    def _paint_spine(self, cv):
        xs0 = self.x_s
        levels = self._levels()
        sl = cv.box([xs0 - 75, self.y_c - 65, -1e4], [xs0 + 75, self.y_vb + 30, 1e4])
        if sl is None:
            return
        xs, ys, zs = cv.coords(sl)
        X = (xs - xs0)[:, None, None]
        Y = ys[None, :, None]
        yvb = self.y_vb_at(zs).astype(np.float32)[None, None, :]
        yc = yvb - 27.0
        n = len(zs)
        semi_x = np.full(n, 24.0, np.float32)
        semi_y = np.full(n, 16.0, np.float32)
        kind = np.zeros(n, np.int8)  # 1 vertebral body, 2 disc
        zrel = np.zeros(n, np.float32)  # height above the centre of the vertebra the slice belongs to
        hh = np.ones(n, np.float32)
        lumbar = np.zeros(n, bool)
        for name, zc, h, dsc in levels:
            inb = np.abs(zs - zc) <= h / 2
            ind = (zs < zc - h / 2) & (zs >= zc - h / 2 - dsc)
            wide = 1.0 + (0.12 if name[0] == "L" else 0.0) + (0.5 if name == "S1" else 0.0)
            for m, k in ((inb, 1), (ind, 2)):
                kind[m] = k
                semi_x[m] = 22.0 * wide
                semi_y[m] = 15.5 * (1.0 + 0.1 * (name[0] != "T"))
                lumbar[m] = name[0] != "T"
                zrel[m] = (zs - zc)[m]
                hh[m] = h / 2
        ex = semi_x[None, None, :]
        ey = semi_y[None, None, :]
        zk = kind[None, None, :]
        zr = zrel[None, None, :]
        lum = lumbar[None, None, :]
        dist_body = (np.sqrt((X / ex) ** 2 + ((Y - yvb) / ey) ** 2) - 1.0) * ey
        in_body = (dist_body < 0) & (zk == 1)
        cortical = in_body & ((dist_body > -2.0) | ((hh[None, None, :] - np.abs(zr)) < 1.6))
        disc = (dist_body < 0.5) & (zk == 2)
        # canal; posterior arch (pedicles and laminae around the canal), spinous and transverse processes
        rc = np.sqrt((X / 10.5) ** 2 + ((Y - yc) / 9.0) ** 2)
        canal = rc < 1.0
        post_z = (zk == 1) | ((zk == 2) & (zr > -6.0))
        ring = (rc >= 1.0) & (rc < 1.6) & (Y < yvb - ey + 3.0) & post_z
        spinous = (np.abs(X) < 2.5 + 1.5 * lum) & (Y < yc - 9.0) & (Y > yc - 38.0) & post_z & (zr < 4.0)
        tproc = (np.abs(X) < np.where(lum, 38.0, 26.0)) & (np.abs(Y - (yc + 1.0 - 0.15 * np.abs(X))) < 3.0)
        tproc &= (zk == 1) & (np.abs(zr) < 4.0)
        post = ring | spinous | tproc
        post_cort = post & ~ndimage.binary_erosion(post, iterations=1) if post.any() else post
        t = cv.tissue[sl]
        soft = (t == T["muscle"]) | (t == T["visceral_fat"]) | (t == T["fat"])
        t[canal & soft] = T["csf"]
        t[post & soft] = T["cancellous_bone"]
        t[post_cort & soft] = T["cortical_bone"]
        t[in_body & soft] = T["cancellous_bone"]
        t[cortical & soft] = T["cortical_bone"]
        t[disc & soft] = T["disc"]

    # ---- ribs and costal cartilages
    def _wall_point(self, ang: float, z: float, frac: float) -> np.ndarray:
        """Point at polar angle ``ang`` and height z, ``frac`` of the way through fat + muscle from the skin."""
        body = self.body
        c, s = math.cos(ang), math.sin(ang)
        X = np.array([[[c]]], np.float32)
        Y = np.array([[[s]]], np.float32)
        pol = body.polar(X, Y)
        R = float(body.depth([c], [s], [z], pol).ravel()[0]) + 1.0
        f = float(body.fat(pol[0], pol[3], X, [z]).ravel()[0])
        m = float(body.muscle(pol[0], pol[3], X, [z]).ravel()[0])
        rr = R - f - frac * m - 2.0
        return np.array([c * rr, s * rr, z])

    def _rib_paths(self):
        g = self.g
        levels = {n: zc for n, zc, _, _ in self._levels()}
        out = []
        # (vertebra, anterior end angle from the right lateral direction (deg), drop over its length (mm), cartilage)
        spec = [
            ("T6", 78, 70, True),
            ("T7", 70, 80, True),
            ("T8", 58, 88, True),
            ("T9", 45, 92, True),
            ("T10", 28, 92, True),
            ("T11", -5, 75, False),
            ("T12", -40, 50, False),
        ]
        for j, (name, end_deg, drop, cart) in enumerate(spec):
            z0 = levels[name] + 6.0
            for sgn in (1.0, -1.0):
                ths = np.deg2rad(np.linspace(-62.0, end_deg, 16))
                frac = (ths - ths[0]) / (ths[-1] - ths[0])
                zz = z0 - drop * frac**1.3 * g["hz"]
                angles = ths if sgn > 0 else math.pi - ths
                pts = [self._wall_point(t_, z_, 0.55) for t_, z_ in zip(angles, zz, strict=True)]
                pts = [np.array([self.x_s + sgn * 20.0, self.y_c + 4.0, z0 + 4.0])] + pts  # costovertebral joint
                cart_pts = None
                if cart:  # costal cartilage: from the rib end up and in towards the xiphoid
                    e = pts[-1]
                    tip = np.array([sgn * (10.0 + 6.0 * j), e[1] + 10.0, levels["T6"] - 28.0 - 12.0 * j])
                    tip[1] = self._wall_point(math.radians(80.0 if sgn > 0 else 100.0), tip[2], 0.5)[1]
                    mid = 0.5 * (e + tip) + np.array([0.0, 6.0, 6.0])
                    cart_pts = [e, mid, tip]
                out.append((np.array(pts), cart_pts))
        return out

    def _paint_ribs(self, cv):
        for pts, cart in self._rib_paths():
            if pts[:, 2].max() < cv.zs[0] - 10 or pts[:, 2].min() > cv.zs[-1] + 10:
                continue
            p, r = _spline(pts, np.full(len(pts), 5.0), 8.0)
            self._paint_bone_tube(cv, p, r)
            if cart is not None:
                p, r = _spline(cart, [5.0, 4.5, 4.0], 6.0)
                sl = cv.box(p.min(0) - 8, p.max(0) + 8)
                if sl is None:
                    continue
                d = _tube(*cv.coords(sl), p, r, 3.0)
                t = cv.tissue[sl]
                t[(d < 0) & ((t == T["muscle"]) | (t == T["visceral_fat"]) | (t == T["fat"]))] = T["cartilage"]

    def _paint_bone_tube(self, cv, p, r):
        sl = cv.box(p.min(0) - r.max() - 4, p.max(0) + r.max() + 4)
        if sl is None:
            return
        d = _tube(*cv.coords(sl), p, r, 3.0)
        t = cv.tissue[sl]
        soft = (t == T["muscle"]) | (t == T["visceral_fat"]) | (t == T["fat"])
        t[(d < 0) & soft] = T["cortical_bone"]
        t[(d < -1.8) & soft] = T["cancellous_bone"]

    # ---- iliac wings (only in long fields of view)
    def _paint_pelvis(self, cv):
        g = self.g
        zc = g["z_crest"]
        if cv.zs[0] > zc:
            return
        for sgn in (1.0, -1.0):
            c = np.array([sgn * (self.Wc * 0.42), self.y_vb + 18.0, zc + 10.0])
            sl = cv.box(c - [80, 90, 160], c + [80, 90, 0])
            if sl is None:
                continue
            xs, ys, zs = cv.coords(sl)
            e = _eval_coarse(lambda x, y, z, c=c: _ellipsoid(x, y, z, c, [70.0 * self.sx, 62.0, 150.0]), xs, ys, zs)
            Z = zs[None, None, :]
            X = xs[:, None, None]
            Y = ys[None, :, None]
            lateral = sgn * (X - c[0]) > -20.0 + 0.9 * np.maximum(Y - c[1], 0.0)  # open towards the front and midline
            sector = (Z < zc) & lateral & (Y < c[1] + 45.0 + 0.3 * (zc - Z))
            wing = sector & (np.abs(e) < 3.5 + 2.0 * _smoothstep(zc - 20, zc - 100, Z))
            musc = sector & (e > -14.0) & (e < 25.0)  # iliacus inside the fossa, gluteal muscles outside
            t = cv.tissue[sl]
            soft = (t == T["muscle"]) | (t == T["visceral_fat"]) | (t == T["fat"])
            t[musc & (t == T["visceral_fat"])] = T["muscle"]
            t[wing & soft] = T["cancellous_bone"]
            t[wing & soft & (np.abs(e) > 2.0)] = T["cortical_bone"]

    # ---- diaphragm, lungs, mediastinum, heart
    def _paint_thorax(self, cv):
        g, body = self.g, self.body
        z_low = min(g["dome_floor_post"], g["dome_floor_ant"]) - 10.0
        sl = cv.box([-1e4, -1e4, z_low], [1e4, 1e4, 1e4])
        if sl is None:
            return
        xs, ys, zs = cv.coords(sl)
        zd = body.diaphragm_z(xs, ys)
        Z = zs[None, None, :]
        t = cv.tissue[sl]
        o = cv.owner[sl]
        cavity = t == T["visceral_fat"]
        gx = np.gradient(zd[:, :, 0], xs, axis=0) if len(xs) > 1 else 0.0
        gy = np.gradient(zd[:, :, 0], ys, axis=1) if len(ys) > 1 else 0.0
        cosn = (1.0 / np.sqrt(1.0 + gx**2 + gy**2))[:, :, None]
        dn = (Z - zd) * cosn  # about the normal distance to the diaphragm surface
        above = dn > 2.5
        dia = (np.abs(dn) <= 2.5) & cavity
        X = xs[:, None, None]
        Y = ys[None, :, None]
        xa = self.x_s - 14.0
        med = (X > xa - 34.0) & (X < self.x_s + 24.0) & (Y > self.y_vb - 8.0)  # posterior mediastinum
        hxy = [g["heart_x"], self.y_A + 62.0 * self.sy]
        hc = np.array([hxy[0], hxy[1], float(body.diaphragm_z([hxy[0]], [hxy[1]]).ravel()[0]) + 58.0])
        rot = _frame([0.5, 0.45, 0.75], [0.0, 1.0, 0.0])
        hsd = _eval_coarse(lambda x, y, z: _ellipsoid(x, y, z, hc, [58.0, 48.0, 78.0], rot), xs, ys, zs)
        heart = (hsd < 0) & above & cavity
        lung = above & cavity & ~med & (hsd > 4.0)
        t[dia] = T["muscle"]
        t[lung] = T["lung"]
        t[heart] = T["myocardium"]
        t[heart & (hsd < -9.0)] = T["heart_blood"]
        o[heart] = _OWN["heart"]

    # ---- small bowel: packed loops (random-walk tubes with wall, fluid, some gas) in the peritoneal cavity
    def _bowel_paths(self):
        g, rng = self.g, self.rng("small_bowel")
        lo = np.array([-(self.Wc - 22.0), self.y_A + 2.0, g["z_crest"] - 110.0])
        hi = np.array([self.Wc - 22.0, self.Dc - 6.0, g["z_P"] + 25.0])
        c, half = (lo + hi) / 2, (hi - lo) / 2
        paths = []
        for _ in range(int(rng.integers(14, 20))):
            p = c + half * rng.uniform(-0.8, 0.8, 3)
            d = _unit(rng.normal(size=3))
            pts = [p.copy()]
            for _ in range(int(rng.integers(60, 110))):
                q = (p - c) / half
                r = float(np.linalg.norm(q))
                d = d + 0.6 * rng.normal(size=3) - (1.5 * q / r if r > 0.85 else 0.0)
                d = _unit(d)
                p = p + 9.0 * d
                pts.append(p.copy())
            kind = str(rng.choice(["fluid", "gas", "collapsed"], p=[0.65, 0.2, 0.15]))
            radius = 6.0 if kind == "collapsed" else float(rng.uniform(9.0, 13.0))
            paths.append((np.array(pts), radius, kind))
        return paths

    def _paint_small_bowel(self, cv):
        body = self.body
        paths = self._bowel_paths()
        allp = np.vstack([p for p, _, _ in paths])
        lo_f, hi_f = allp.min(0) - 20.0, allp.max(0) + 20.0
        sl0 = cv.box(lo_f, hi_f)
        if sl0 is None:
            return
        xs, ys, zs = cv.coords(sl0)
        X = xs[:, None, None]
        Y = ys[None, :, None]
        # peritoneal space: in front of the retroperitoneum (which curves back in the flanks), below the diaphragm,
        # away from the kidneys (perirenal fat)
        y_peri = self.y_A + 16.0 - 42.0 * _smoothstep(35.0, 95.0 * self.sx, np.abs(X))
        ok = (Y > y_peri) & (body.below_diaphragm(xs, ys, zs, 10.0) < 0) & (cv.tissue[sl0] == T["visceral_fat"])
        for k in self.kidneys.values():
            ks = cv.box(*k.box())
            if ks is None:
                continue
            ks = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(ks, sl0, strict=False))
            if any(a.stop <= a.start for a in ks):
                continue
            rel = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(ks, sl0, strict=False))
            sub = ok[rel]
            sub &= _eval_coarse(k.sdf, *cv.coords(ks)) > 14.0
        G = _Field(self.rng("bowel_gas"), lo_f, hi_f, 10.0)
        own = _OWN["small_bowel"]

        def where(sl):
            rel = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sl, sl0, strict=False))
            return ok[rel] | (cv.owner[sl] == own)

        for pts, radius, kind in paths:
            p, r = _spline(pts, np.full(len(pts), radius), 6.0)
            p = np.clip(p, lo_f + 1, hi_f - 1)
            if kind == "collapsed":
                self._paint_tube(cv, p, r, where, T["gi_wall"], own)
                continue
            res = self._paint_tube(cv, p, r, where, T["gi_wall"], own, 2.2, T["gi_fluid"])
            if res is not None and kind == "gas":
                sl, d, m = res
                gas = m & (d < -2.2) & (G(*cv.coords(sl)) > -0.2)
                cv.paint(sl, gas, T["gas"], own)

    # ---- organs
    def _paint_organ(self, cv, org: _Organ):
        sl = cv.box(*org.box())
        if sl is None:
            return None, None
        d = _eval_coarse(org.sdf, *cv.coords(sl))
        return sl, (d, (d < 0) & cv.free(sl))

    def _paint_organs(self, cv):
        g = self.g
        # kidneys: cortex rim, medulla (pyramids) inside, pelvis in the sinus fat at the hilum
        for side, org in self.kidneys.items():
            sl, res = self._paint_organ(cv, org)
            if sl is None:
                continue
            d, mask = res
            xs, ys, zs = cv.coords(sl)
            k = self.kidney_info[side]
            s = org.s
            pelvis = _eval_coarse(
                lambda x, y, z, k=k, s=s: _ellipsoid(
                    x, y, z, k["c"] + k["hd"] * 16.0 * s, np.array([7.0, 6.0, 14.0]) * s, k["rot"]
                ),
                xs,
                ys,
                zs,
            )
            pyr = _Field(self.rng(f"pyramids_{side}"), k["c"] - 80, k["c"] + 80, 7.0)(xs, ys, zs)
            own = _OWN[org.name]
            cv.paint(sl, mask, T["kidney_cortex"], own)
            cv.paint(sl, mask & (d < -6.5 * s) & (pyr > -0.3), T["kidney_medulla"], own)
            cv.paint(sl, (pelvis < 0) & cv.free(sl), T["urine"], own)
        # pancreas
        sl, res = self._paint_organ(cv, self.pancreas)
        if sl is not None:
            cv.paint(sl, res[1], T["pancreas"], _OWN["pancreas"])
        # stomach: wall, contents (fluid or food, dependent = posterior) and air (non-dependent = anterior)
        sl, res = self._paint_organ(cv, self.stomach)
        if sl is not None:
            d, mask = res
            xs, ys, zs = cv.coords(sl)
            own = _OWN["stomach"]
            cv.paint(sl, mask, T["gi_wall"], own)
            lumen = mask & (d < -4.0)
            cv.paint(sl, lumen, T["stool"] if g["stomach_food"] else T["gi_fluid"], own)
            lum_y = np.broadcast_to(ys[None, :, None], d.shape)[lumen]
            if lum_y.size:
                y_air = np.quantile(lum_y, 1.0 - 0.35 * g["stomach_air"])
                cv.paint(sl, lumen & (ys[None, :, None] > y_air), T["gas"], own)
        # gallbladder: thin enhancing wall, bile
        sl, res = self._paint_organ(cv, self.gallbladder)
        if sl is not None:
            d, mask = res
            cv.paint(sl, mask, T["gallbladder_wall"], _OWN["gallbladder"])
            cv.paint(sl, mask & (d < -2.0), T["bile"], _OWN["gallbladder"])
        for org in (self.spleen, self.liver):
            sl, res = self._paint_organ(cv, org)
            if sl is not None:
                cv.paint(sl, res[1], T[org.name], _OWN[org.name])

    def _paint_tube(self, cv, pts, rad, where, tissue, owner, wall=None, lumen_tissue=None, pad=4.0):
        sl = cv.box(pts.min(0) - rad.max() - pad, pts.max(0) + rad.max() + pad)
        if sl is None:
            return None
        step = min(1.4, float(rad.min()) / 2.5)
        d = _eval_coarse(lambda x, y, z: _tube(x, y, z, pts, rad, pad), *cv.coords(sl), step=step)
        m = (d < 0) & where(sl)
        cv.paint(sl, m, tissue, owner)
        if wall is not None:
            cv.paint(sl, m & (d < -wall), lumen_tissue, owner)
        return sl, d, m

    def _paint_gi_tubes(self, cv):
        g = self.g
        # duodenum: fluid with a little gas
        pts, rad = self.duodenum
        res = self._paint_tube(cv, pts, rad, cv.free, T["gi_wall"], _OWN["duodenum"], 2.5, T["gi_fluid"])
        if res is not None:
            sl, d, m = res
            G = _Field(self.rng("duodenum_gas"), pts.min(0) - 30, pts.max(0) + 30, 12.0)(*cv.coords(sl))
            cv.paint(sl, m & (d < -2.5) & (G > 1.5), T["gas"], _OWN["duodenum"])
        # colon: stool with gas bubbles, gas anteriorly (non-dependent)
        pts, rad = self.colon
        res = self._paint_tube(cv, pts, rad, cv.free, T["gi_wall"], _OWN["colon"], 2.0, T["stool"])
        if res is not None:
            sl, d, m = res
            xs, ys, zs = cv.coords(sl)
            G = _Field(self.rng("colon_gas"), pts.min(0) - 40, pts.max(0) + 40, 14.0)(xs, ys, zs)
            gas = m & (d < -2.0) & (G + 0.012 * (ys[None, :, None] - self.y_A) > 1.6 - g["bowel_gas"])
            cv.paint(sl, gas, T["gas"], _OWN["colon"])

    # ---- vessels
    def _paint_vessels(self, cv):
        ok = cv.vessel_ok
        for key, tissue in (
            ("inferior_vena_cava", "caval_blood"),
            ("portal_vein", "portal_blood"),
            ("artery", "arterial_blood"),
        ):
            for pts, rad in self.vessels[key]:
                self._paint_tube(cv, pts, rad, ok, T[tissue], _OWN[key])
        for pts, rad in self.vessels["caval_extra"]:  # renal and iliac veins: drawn, never labelled
            self._paint_tube(cv, pts, rad, ok, T["caval_blood"], 0)

        def in_liver(sl):
            return cv.owner[sl] == _OWN["liver"]

        for pts, rad in self.vessels["hepatic_vein"]:
            self._paint_tube(cv, pts, rad, in_liver, T["hepatic_vein"], _OWN["liver"])
        pts, rad = self.esophagus  # muscular wall with a little air centrally
        res = self._paint_tube(cv, pts, rad, ok, T["muscle"], _OWN["esophagus"])
        if res is not None:
            sl, d, m = res
            cv.paint(sl, m & (d < -6.5), T["gas"], _OWN["esophagus"])


# ------------------------------------------------------------------------------------------------------ the API


@dataclass
class Phantom:
    """One generated case.

    ``image`` (int16 HU) and ``label`` (uint8) are (X, Y, Z) arrays in the stored voxel order, ``affine`` maps voxel
    indices to RAS world millimetres, ``labels`` is the label map's ``{name: id}`` and ``params`` records everything
    drawn for the case (JSON-friendly).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    labels: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)

    def save(self, image_path: str | Path, label_path: str | Path) -> tuple[Path, Path]:
        """Write image (int16) and label (uint8) NIfTI files with the affine in both qform and sform."""
        import nibabel as nib

        out = []
        for arr, path, dtype in ((self.image, image_path, np.int16), (self.label, label_path, np.uint8)):
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            img = nib.Nifti1Image(np.asarray(arr).astype(dtype, copy=False), self.affine)
            img.header.set_data_dtype(dtype)
            img.set_qform(self.affine, code=1)
            img.set_sform(self.affine, code=1)
            img.header.set_xyzt_units("mm", "sec")
            nib.save(img, str(path))
            out.append(path)
        return out[0], out[1]


def _orientation_flips(code: str) -> tuple[bool, bool, bool]:
    code = code.upper()
    allowed = {"R": False, "L": True}, {"A": False, "P": True}, {"S": False, "I": True}
    if len(code) != 3 or any(c not in a for c, a in zip(code, allowed, strict=False)):
        raise ValueError(
            f"orientation must be one of RAS, LAS, LPS, RPS, RAI, LAI, RPI, LPI (no axis swaps), got {code!r}"
        )
    return tuple(a[c] for c, a in zip(code, allowed, strict=False))


def _resolve_grid(acq: dict, a_half: float, cfg: dict, overrides: dict, g: dict, anatomy_span: tuple[float, float]):
    """Matrix, spacing, slice count and canonical voxel centres from the preset, the body and the overrides."""
    m = overrides.get("matrix", cfg["matrix"])
    nx, ny = (int(m), int(m)) if np.isscalar(m) else (int(m[0]), int(m[1]))
    lo, hi = cfg["spacing"]
    sxy = float(np.clip(2.0 * a_half * acq["fov_fill"] / nx, lo, hi))
    sz = float(acq["slice_spacing"])
    if "slice_spacing" in overrides:
        sz = float(overrides["slice_spacing"])
    if "spacing" in overrides:
        sp = overrides["spacing"]
        if np.isscalar(sp):
            sxy = float(sp)
        else:
            sp = [float(v) for v in sp]
            if len(sp) != 3:
                raise ValueError(f"spacing must be a number or (sx, sy, sz), got {sp}")
            sxy, sz = sp[0], sp[2]
            if abs(sp[0] - sp[1]) > 1e-9:
                raise ValueError(f"in-plane spacing must be isotropic, got {sp[:2]}")
    if sxy <= 0 or sz <= 0:
        raise ValueError(f"spacing must be positive, got {sxy}, {sz}")
    z_hi, z_lo_needed = anatomy_span
    top = z_hi + acq["top_margin"]
    if "n_slices" in overrides:
        nz = int(overrides["n_slices"])
        if nz < 1:
            raise ValueError(f"n_slices must be >= 1, got {nz}")
    elif "z_extent" in overrides:
        nz = max(1, int(round(float(overrides["z_extent"]) / sz)))
    else:
        nz = int(math.ceil(max(acq["z_extent"], top - z_lo_needed) / sz)) + 1
        if nz > int(cfg["max_slices"]):
            nz = int(cfg["max_slices"])  # memory guard: keep the organs, give up top margin first
            top = min(top, max(z_lo_needed + (nz - 1) * sz, z_hi + 5.0))
    # in-plane: centre on the body in x; in y so that the body and (if it fits) the table are inside
    fov = nx * sxy
    y_back = -g["b"] - g["table_gap"] - g["table_thick"] * 0.6
    y_front = g["b"] + 5.0
    cy = 0.5 * (y_back + y_front) if (y_front - y_back) < ny * sxy else 0.0
    cx = acq["fov_dx"] * (fov > 2 * a_half + 40)
    xs = cx + (np.arange(nx) - (nx - 1) / 2.0) * sxy
    ys = cy + (np.arange(ny) - (ny - 1) / 2.0) * sxy
    zs = top - (nz - 1) * sz + np.arange(nz) * sz
    return xs, ys, zs, (sxy, sxy, sz)


def _hu_image(cv: _Canvas, hu: dict, phase: str, an: _Anatomy, acq: dict, spacing, seed: int) -> np.ndarray:
    """Tissue map -> HU: per-tissue values and textures, partial-volume blur, correlated noise."""
    n = len(_TISSUE_NAMES)
    base = np.array([hu[name] for name in _TISSUE_NAMES], np.float32)
    af = np.zeros(n, np.float32)
    ac = np.zeros(n, np.float32)
    for name, (f_, c_) in _TEXTURE.items():
        af[T[name]], ac[T[name]] = f_, c_
    if phase == "arterial":  # heterogeneous ("zebra") spleen and mixing in the IVC
        ac[T["spleen"]] = 22.0
        ac[T["caval_blood"]] = 20.0
    lo = np.array([cv.xs[0], cv.ys[0], cv.zs[0]]) - 5
    hi = np.array([cv.xs[-1], cv.ys[-1], cv.zs[-1]]) + 5
    fine = _Field(_child_rng(seed, "texture_fine"), lo, hi, 2.5)
    coarse = _Field(_child_rng(seed, "texture_coarse"), lo, hi, 12.0)
    img = np.empty(cv.shape, np.float32)
    chunk = max(1, int(2e6 // (cv.shape[0] * cv.shape[1])))
    y_dep = _smoothstep(an.y_vb + 60.0, an.y_vb - 40.0, cv.ys)[None, :, None].astype(np.float32)
    for k0 in range(0, cv.shape[2], chunk):
        k1 = min(k0 + chunk, cv.shape[2])
        t = cv.tissue[:, :, k0:k1]
        zs = cv.zs[k0:k1]
        tf = fine(cv.xs, cv.ys, zs)
        tc = coarse(cv.xs, cv.ys, zs)
        v = base[t] + af[t] * tf + ac[t] * tc
        lung = t == T["lung"]
        if lung.any():  # denser dependent lung, vessels as bright dots
            v = np.where(lung, v + 70.0 * y_dep + np.where(tf > 2.0, 650.0, 0.0), v)
        st = t == T["stool"]
        if st.any():  # gas bubbles in stool
            v = np.where(st & (tf > 1.1), -850.0 + 40.0 * tc, v)
        img[:, :, k0:k1] = v
    # partial volume: the voxel footprint (a box, sigma 0.29 voxel) and the in-plane point spread of the scanner
    sig = [math.sqrt(0.29**2 + (acq["psf_mm"] / s) ** 2) for s in spacing[:2]] + [0.35]
    img = ndimage.gaussian_filter(img, sig, mode="nearest", truncate=3.0)
    # correlated noise: white noise blurred in-plane, rescaled to the drawn standard deviation
    rng = _child_rng(seed, "noise")
    sn = acq["noise_corr_mm"] / spacing[0]
    delta = np.zeros(33, np.float32)
    delta[16] = 1.0
    k = ndimage.gaussian_filter1d(delta, sn, truncate=3.0) if sn > 0.05 else delta
    gain = float(np.sum(k**2))  # variance factor per axis
    scale = acq["noise_std"] / math.sqrt(gain * gain)
    chunk = max(1, int(4e6 // (cv.shape[0] * cv.shape[1])))
    for k0 in range(0, cv.shape[2], chunk):
        k1 = min(k0 + chunk, cv.shape[2])
        nz = rng.standard_normal((cv.shape[0], cv.shape[1], k1 - k0), dtype=np.float32)
        if sn > 0.05:
            nz = ndimage.gaussian_filter(nz, [sn, sn, 0.0], mode="wrap", truncate=3.0)
        img[:, :, k0:k1] += np.float32(scale) * nz
    if acq.get("recon_circle"):
        r2 = (0.5 * min(cv.shape[0], cv.shape[1]) * spacing[0]) ** 2
        cxy = (cv.xs.mean(), cv.ys.mean())
        outside = ((cv.xs[:, None] - cxy[0]) ** 2 + (cv.ys[None, :] - cxy[1]) ** 2) > r2
        np.clip(img, -1024, 3071, out=img)
        img[outside] = -2048.0
        return np.rint(img).astype(np.int16)
    np.clip(img, -1024, 3071, out=img)
    return np.rint(img).astype(np.int16)


def generate_phantom(seed: int, labels="paper", preset: str = "demo", **overrides) -> Phantom:
    """Generate one synthetic abdominal CT with its label map.

    Args:
        seed: the case seed; the same seed gives byte-identical image and label.
        labels: what ``custom.labels.resolve_labels`` accepts (default: the paper's seven, K = 8 with background).
            Structures outside the set are drawn all the same and get label 0.
        preset: ``"full"`` (512x512, 0.6-0.9 mm, 0.5-2.5 mm slices), ``"demo"`` (128x128 over the same field of view,
            2.4-3.6 mm, 2.5-5 mm slices) or ``"tiny"`` (64x64, ~6 mm, for unit tests).
        overrides: see ``OVERRIDES`` (matrix, spacing, slice_spacing, n_slices, z_extent, orientation, phase,
            noise_std, recon_circle). They replace drawn values without changing any other draw.

    >>> p = generate_phantom(3, labels="extended", preset="tiny", orientation="LPS", phase="portal_venous")
    >>> p.params["orientation"], p.labels["kidney_left"], p.image.dtype.name
    ('LPS', 9, 'int16')
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"unknown override(s) {unknown}; allowed: {OVERRIDES}")
    label_map = resolve_labels(labels)
    cfg = PRESETS[preset]
    seed = int(seed)
    rng = np.random.default_rng(seed)
    drawn = _sample_params(rng, cfg)
    g, acq = drawn["anatomy"], drawn["acquisition"]
    for key in ("orientation", "phase", "noise_std", "recon_circle"):
        if key in overrides:
            acq[key] = overrides[key]
    if acq["phase"] not in PHASES:
        raise ValueError(f"phase must be one of {list(PHASES)}, got {acq['phase']!r}")
    flips = _orientation_flips(acq["orientation"])
    acq["orientation"] = acq["orientation"].upper()
    an = _Anatomy(seed, g)
    span = (g["z_R"], min(an.kidneys["R"].box()[0][2] + 25.0, g["z_P"] - 95.0))
    xs, ys, zs, spacing = _resolve_grid(acq, g["a"], cfg, overrides, g, span)
    cv = _Canvas(xs, ys, zs)
    an.render(cv)
    hu = {name: v[acq["phase"]] for name, v in g["hu_all"].items()}
    image = _hu_image(cv, hu, acq["phase"], an, acq, spacing, seed)
    # labels: owner -> label id (0 for structures outside the set)
    lut = np.zeros(256, np.uint8)
    for name, i in label_map.items():
        lut[_OWN[name]] = i
    label = lut[cv.owner]
    counts = np.bincount(cv.owner.ravel(), minlength=len(OWNERS) + 1)
    vox_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    volumes = {name: round(float(counts[_OWN[name]]) * vox_ml, 2) for name in OWNERS}
    del cv
    # canonical RAS grid -> affine, then the requested voxel order
    off = np.asarray(acq["world_offset"], float)
    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [xs[0] + off[0], ys[0] + off[1], zs[0] + off[2]]
    for axis, flip in enumerate(flips):
        if flip:
            image = np.flip(image, axis)
            label = np.flip(label, axis)
            affine[:3, 3] += affine[:3, axis] * (image.shape[axis] - 1)
            affine[:3, axis] *= -1.0
    image = np.ascontiguousarray(image)
    label = np.ascontiguousarray(label)
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "preset": preset,
        "overrides": {k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items()},
        "shape": list(image.shape),
        "spacing": [round(float(s), 4) for s in spacing],
        "orientation": acq["orientation"],
        "phase": acq["phase"],
        "noise_std": round(float(acq["noise_std"]), 2),
        "noise_corr_mm": round(acq["noise_corr_mm"], 3),
        "psf_mm": round(acq["psf_mm"], 3),
        "recon_circle": bool(acq["recon_circle"]),
        "fov_mm": [round(image.shape[0] * spacing[0], 1), round(image.shape[1] * spacing[1], 1)],
        "z_extent_mm": round(image.shape[2] * spacing[2], 1),
        "body": {
            "habitus": round(g["habitus"], 3),
            "lr_width_mm": round(2 * g["a"], 1),
            "ap_depth_mm": round(2 * g["b"], 1),
            "subcutaneous_fat_mm": round(g["fat"], 1),
        },
        "volumes_ml": volumes,
        "target_volumes_ml": {k: round(v, 1) for k, v in g["targets_ml"].items()},
        "hu": {k: v for k, v in hu.items()},
    }
    return Phantom(image=image, label=label, affine=affine, labels=dict(label_map), params=params)


def _case_seeds(seed: int, n: int) -> list[int]:
    """n distinct case seeds derived from one dataset seed."""
    ss = np.random.SeedSequence(int(seed))
    out: list[int] = []
    for child in ss.spawn(n * 2 + 8):
        v = int(child.generate_state(1, np.uint32)[0] & 0x7FFFFFFF)
        if v not in out:
            out.append(v)
        if len(out) == n:
            break
    return out


_MSD_PARTS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "dataset.json")


def write_dataset(
    out_dir: str | Path,
    n_train: int = 8,
    n_test: int = 4,
    seed: int = 0,
    labels="paper",
    preset: str = "demo",
    overwrite: bool = False,
    **overrides,
) -> Path:
    """Write a phantom dataset in the Medical Segmentation Decathlon layout and return the path of ``dataset.json``.

    Case ids are ``phantom_0000``, ... (training first, then test); every case has its own seed derived from ``seed``,
    recorded with its parameters in the ``phantom`` block of ``dataset.json``. An existing non-empty folder is only
    replaced with ``overwrite=True`` (then the MSD parts are deleted first; other files are left alone).

    >>> import tempfile
    >>> from monai.data import load_decathlon_datalist
    >>> path = write_dataset(tempfile.mkdtemp(), n_train=1, n_test=1, preset="tiny")
    >>> len(load_decathlon_datalist(path, data_list_key="training"))
    1
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace the dataset there")
        for part in _MSD_PARTS:
            p = out / part
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    label_map = resolve_labels(labels)
    n_train, n_test = int(n_train), int(n_test)
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    seeds = _case_seeds(seed, n_train + n_test)
    training, test, cases = [], [], []
    for i, case_seed in enumerate(seeds):
        cid = f"phantom_{i:04d}"
        split = "training" if i < n_train else "test"
        img_dir, lbl_dir = ("imagesTr", "labelsTr") if split == "training" else ("imagesTs", "labelsTs")
        p = generate_phantom(case_seed, labels=label_map, preset=preset, **overrides)
        p.save(out / img_dir / f"{cid}.nii.gz", out / lbl_dir / f"{cid}.nii.gz")
        entry = {"image": f"./{img_dir}/{cid}.nii.gz", "label": f"./{lbl_dir}/{cid}.nii.gz", "case_id": cid}
        (training if split == "training" else test).append(entry)
        cases.append({"case_id": cid, "split": split, "seed": case_seed, "params": p.params})
    names = label_names(label_map)
    meta = {
        "name": "CascadePhantoms",
        "description": "Synthetic abdominal CT phantoms (custom.phantom) for the cascaded 3D FCN bundle",
        "reference": "generated; see bundle/docs/phantoms.md",
        "licence": "Apache-2.0",
        "release": GENERATOR_VERSION,
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(i): n for i, n in enumerate(names)},
        "numTraining": n_train,
        "numTest": n_test,
        "training": training,
        "test": test,
        "phantom": {
            "generator": "custom.phantom",
            "version": GENERATOR_VERSION,
            "seed": int(seed),
            "preset": preset,
            "labels": label_map,
            "overrides": {k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items()},
            "cases": cases,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dataset.json"
    path.write_text(json.dumps(meta, indent=2))
    return path


def preview(
    seed: int = 0,
    out: str = "bundle/docs/phantom_preview.png",
    preset: str = "full",
    labels="extended",
    **overrides,
) -> str:
    """Generate one phantom and write its axial / coronal / sagittal preview PNG; returns the PNG path."""
    from custom.preview import save_preview

    p = generate_phantom(seed, labels=labels, preset=preset, **overrides)
    pr = p.params
    title = (
        f"phantom seed {seed} ({preset}): {pr['phase']}, {pr['orientation']}, "
        f"{'x'.join(map(str, pr['shape']))} @ {'x'.join(f'{s:g}' for s in pr['spacing'])} mm, "
        f"noise {pr['noise_std']:.0f} HU"
    )
    return str(save_preview(p.image, p.label, p.affine, out, label_names=label_names(p.labels), title=title))


def _cli_write_dataset(
    out_dir: str,
    n_train: int = 8,
    n_test: int = 4,
    seed: int = 0,
    labels="paper",
    preset: str = "demo",
    overwrite: bool = False,
    **overrides,
) -> str:
    from custom.options import as_bool  # fire passes --overwrite false as the truthy string 'false'

    return str(
        write_dataset(out_dir, n_train, n_test, seed, labels, preset, as_bool(overwrite, "overwrite"), **overrides)
    )


def main() -> None:
    import fire

    fire.Fire({"write_dataset": _cli_write_dataset, "preview": preview})


if __name__ == "__main__":
    main()
