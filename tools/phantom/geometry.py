"""Implicit surfaces and smooth random fields: the geometry every structure of a phantom is drawn with.

Shapes are approximate signed distances in millimetres (negative inside), evaluated on the axes of a box
(``xs``, ``ys``, ``zs`` broadcast to (nx, ny, nz)); fields are smooth random functions defined in millimetres, so they
are the same whatever grid evaluates them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np
from scipy import sparse

#: Distance (mm) that stands for "far outside".
BIG = np.float32(1e4)


def smoothstep(e0: float, e1: float, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def smin(a, b, k: float):
    """Polynomial smooth minimum (smooth union of two signed distances)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smax(a, b, k: float):
    return -smin(-a, -b, k)


def unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def frame(w_axis, v_hint) -> np.ndarray:
    """Rotation whose columns are orthonormal (u, v, w) with w along ``w_axis`` and v close to ``v_hint``."""
    w = unit(w_axis)
    u = unit(np.cross(v_hint, w))
    v = np.cross(w, u)
    return np.stack([u, v, w], axis=1)


def grid3(xs, ys, zs, c):
    return (
        (np.asarray(xs, np.float32) - np.float32(c[0]))[:, None, None],
        (np.asarray(ys, np.float32) - np.float32(c[1]))[None, :, None],
        (np.asarray(zs, np.float32) - np.float32(c[2]))[None, None, :],
    )


def ellipsoid(xs, ys, zs, c, radii, rot=None) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid with centre c, semi-axes radii, local axes = columns of rot."""
    x, y, z = grid3(xs, ys, zs, c)
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


def plane(xs, ys, zs, p, n) -> np.ndarray:
    """Signed distance to the half-space {q: (q - p) . n <= 0} (n need not be unit)."""
    n = unit(n).astype(np.float32)
    x, y, z = grid3(xs, ys, zs, p)
    return (n[0] * x + n[1] * y + n[2] * z).astype(np.float32)


def spline(ctrl, radii, step: float) -> tuple[np.ndarray, np.ndarray]:
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


def tube(xs, ys, zs, pts, rad, pad: float = 8.0) -> np.ndarray:
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
    out = np.full(shape, BIG, np.float32)
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
        val = np.where(far, BIG, dist - drad[j]).astype(np.float32)
        out[sub] = val.reshape(out[sub].shape)
        return out
    for i in live:
        sl = tuple(slice(int(idx[k][0][i]), int(idx[k][1][i])) for k in range(3))
        a, b = pts[i], pts[i + 1]
        x, y, z = grid3(xs[sl[0]], ys[sl[1]], zs[sl[2]], a)
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


class Field:
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
        return contract(a, mats)


def contract(a: np.ndarray, mats: list) -> np.ndarray:
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


def linear_matrix(src: np.ndarray, dst: np.ndarray):
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


def eval_coarse(fn: Callable, xs, ys, zs, step: float = 1.4) -> np.ndarray:
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
    return contract(v, [linear_matrix(cs, c) for cs, c in zip(coarse, axes, strict=False)])


def child_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])
