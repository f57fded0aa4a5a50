"""The gut: oesophagus, duodenum, colon (with haustra) and the random-walk loops of the small bowel, as tube paths.

Stomach and pancreas are organs (``tools.phantom.organs``); these tubes are unlabelled owners that the organs and the
label map must tell apart from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tools.phantom.geometry import spline, unit

if TYPE_CHECKING:
    from tools.phantom.anatomy import Anatomy


def build_gut(an: Anatomy) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"esophagus", "duodenum", "colon"}`` -> (points, radii) of one anatomy."""
    g, sx = an.g, an.sx
    yA, yvb, zP, zR = an.y_A, an.y_vb, g["z_P"], g["z_R"]
    ra = g["aorta_r"]
    xa = an.x_s - 14.0
    top = zR + 250.0
    # ---- oesophagus (posterior mediastinum -> hiatus -> cardia)
    ge = an.ge_junction
    esophagus = spline(
        [[xa + 12.0, yA + 2.0, top], [xa + 8.0, yA + 10.0, zR + 30.0], [xa + 2.0, yA + 16.0, zR - 10.0], list(ge)],
        [8.0, 8.0, 8.5, 9.0],
        6.0,
    )
    # ---- duodenum (C-loop around the pancreatic head: D1 from the pylorus, D2 down, D3 across, D4 up)
    py = an.pylorus
    duodenum = spline(
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
    Dc, Wc = an.Dc, an.Wc
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
    pts, rad = spline(ctrl, [28, 24, 22, 22, 22, 22, 20, 20, 18], 6.0)
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    rad = rad * (1.0 + 0.12 * np.cos(2 * np.pi * s / 28.0))  # haustra
    colon = (pts, rad)
    return {"esophagus": esophagus, "duodenum": duodenum, "colon": colon}


def bowel_paths(an: Anatomy) -> list[tuple[np.ndarray, float, str]]:
    """Small-bowel loops: (points, radius, kind) with kind fluid, gas or collapsed, packed in the peritoneum."""
    g, rng = an.g, an.rng("small_bowel")
    lo = np.array([-(an.Wc - 22.0), an.y_A + 2.0, g["z_crest"] - 110.0])
    hi = np.array([an.Wc - 22.0, an.Dc - 6.0, g["z_P"] + 25.0])
    c, half = (lo + hi) / 2, (hi - lo) / 2
    paths = []
    for _ in range(int(rng.integers(14, 20))):
        p = c + half * rng.uniform(-0.8, 0.8, 3)
        d = unit(rng.normal(size=3))
        pts = [p.copy()]
        for _ in range(int(rng.integers(60, 110))):
            q = (p - c) / half
            r = float(np.linalg.norm(q))
            d = d + 0.6 * rng.normal(size=3) - (1.5 * q / r if r > 0.85 else 0.0)
            d = unit(d)
            p = p + 9.0 * d
            pts.append(p.copy())
        kind = str(rng.choice(["fluid", "gas", "collapsed"], p=[0.65, 0.2, 0.15]))
        radius = 6.0 if kind == "collapsed" else float(rng.uniform(9.0, 13.0))
        paths.append((np.array(pts), radius, kind))
    return paths
