"""Pelvic organs for fields of view that reach the pelvis (``varied`` preset): urinary bladder, rectum, femoral heads
and the pubic symphysis.

None of these is labelled: they are what real abdomen-pelvis CTs contain and what a network trained only on
upper-abdomen phantoms mistakes for liver or pancreas (``bundle/docs/real_ct.md``). Painted only when the anatomy
says so (``g["pelvic_organs"]``), after the gut and before the vessels, and never over a labelled structure.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from custom.labels import STRUCTURES
from tools.phantom.geometry import ellipsoid, eval_coarse, spline
from tools.phantom.tissues import OWN, T

if TYPE_CHECKING:
    from tools.phantom.anatomy import Anatomy
    from tools.phantom.render import Canvas

_LABELLED_MAX = len(STRUCTURES)  # owner ids 1..len(STRUCTURES) are labelled structures


def _unlabelled(cv: Canvas, sl) -> np.ndarray:
    own = cv.owner[sl]
    return (own == 0) | (own > _LABELLED_MAX)


def paint_pelvic_organs(an: Anatomy, cv: Canvas) -> None:
    """Bladder (urine in a thin wall), rectum (stool), femoral heads and symphysis (bone) below the iliac crest."""
    from tools.phantom.render import paint_tube

    g = an.g
    zc = g["z_crest"]
    if not g.get("pelvic_organs") or cv.zs[0] > zc - 60.0:
        return
    # urinary bladder: anterior midline, behind the symphysis; its size from the drawn volume (ml)
    r = (g["bladder_ml"] * 1000.0 * 3.0 / (4.0 * math.pi) / (1.25 * 0.9 * 0.85)) ** (1.0 / 3.0)
    radii = np.array([1.25 * r, 0.9 * r, 0.85 * r])
    d = np.asarray(g["bladder_d"])
    c = np.array([0.0, an.Dc - radii[1] - 8.0, zc - 105.0]) + d
    sl = cv.box(c - radii - 4.0, c + radii + 4.0)
    if sl is not None:
        e = eval_coarse(lambda x, y, z: ellipsoid(x, y, z, c, radii), *cv.coords(sl))
        ok = _unlabelled(cv, sl) & (cv.tissue[sl] != T["cancellous_bone"]) & (cv.tissue[sl] != T["cortical_bone"])
        cv.paint(sl, (e < 0) & ok, T["gi_wall"], 0)
        cv.paint(sl, (e < -2.5) & ok, T["urine"], 0)
    # rectum: from the sigmoid's end down behind the bladder
    ctrl = [
        [-45.0 * an.sx, an.y_A + 35.0, zc - 90.0],
        [-10.0 * an.sx, an.y_vb + 22.0, zc - 125.0],
        [0.0, an.y_vb + 14.0, zc - 165.0],
        [0.0, an.y_vb + 20.0, zc - 230.0],
    ]
    pts, rad = spline(ctrl, [16.0, 17.0, 18.0, 12.0], 6.0)
    paint_tube(cv, pts, rad, lambda s: _unlabelled(cv, s), T["gi_wall"], OWN["colon"], 2.0, T["stool"])
    # femoral heads and the pubic symphysis: bone only where soft tissue is
    heads = [np.array([sgn * an.Wc * 0.66, an.y_vb + 32.0, zc - 150.0]) for sgn in (1.0, -1.0)]
    sym = np.array([0.0, an.Dc - 4.0, zc - 175.0])
    for cen, rr in [(h, np.array([24.0, 24.0, 24.0])) for h in heads] + [(sym, np.array([22.0, 9.0, 20.0]))]:
        sl = cv.box(cen - rr - 3.0, cen + rr + 3.0)
        if sl is None:
            continue
        e = eval_coarse(lambda x, y, z, cen=cen, rr=rr: ellipsoid(x, y, z, cen, rr), *cv.coords(sl))
        t = cv.tissue[sl]
        soft = np.isin(t, [T["muscle"], T["fat"], T["visceral_fat"], T["gi_fluid"], T["gi_wall"]])
        soft &= _unlabelled(cv, sl)
        t[(e < 0) & soft] = T["cortical_bone"]
        t[(e < -3.0) & soft] = T["cancellous_bone"]
