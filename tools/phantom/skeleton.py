"""The skeleton: vertebrae (bodies, discs, canal, posterior elements) from T6 to S1, ribs with costal cartilages and
the iliac wings, painted into the soft tissue of a canvas."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from tools.phantom.geometry import ellipsoid, eval_coarse, smoothstep, spline, tube
from tools.phantom.tissues import T

if TYPE_CHECKING:
    from tools.phantom.anatomy import Anatomy
    from tools.phantom.render import Canvas


def vertebral_levels(an: Anatomy):
    """(name, z centre, body height, disc below) from T6 down to S1, with L1 at z_L1."""
    g = an.g
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


def paint_spine(an: Anatomy, cv: Canvas) -> None:
    """Vertebral bodies (cortical rim, cancellous core), discs, spinal canal and posterior elements."""
    xs0 = an.x_s
    levels = vertebral_levels(an)
    sl = cv.box([xs0 - 75, an.y_c - 65, -1e4], [xs0 + 75, an.y_vb + 30, 1e4])
    if sl is None:
        return
    xs, ys, zs = cv.coords(sl)
    X = (xs - xs0)[:, None, None]
    Y = ys[None, :, None]
    yvb = an.y_vb_at(zs).astype(np.float32)[None, None, :]
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


def wall_point(an: Anatomy, ang: float, z: float, frac: float) -> np.ndarray:
    """Point at polar angle ``ang`` and height z, ``frac`` of the way through fat + muscle from the skin."""
    body = an.body
    c, s = math.cos(ang), math.sin(ang)
    X = np.array([[[c]]], np.float32)
    Y = np.array([[[s]]], np.float32)
    pol = body.polar(X, Y)
    R = float(body.depth([c], [s], [z], pol).ravel()[0]) + 1.0
    f = float(body.fat(pol[0], pol[3], X, [z]).ravel()[0])
    m = float(body.muscle(pol[0], pol[3], X, [z]).ravel()[0])
    rr = R - f - frac * m - 2.0
    return np.array([c * rr, s * rr, z])


def rib_paths(an: Anatomy):
    """Ribs T6-T12 on both sides: (centre line points, costal cartilage points or None) along the body wall."""
    g = an.g
    levels = {n: zc for n, zc, _, _ in vertebral_levels(an)}
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
            pts = [wall_point(an, t_, z_, 0.55) for t_, z_ in zip(angles, zz, strict=True)]
            pts = [np.array([an.x_s + sgn * 20.0, an.y_c + 4.0, z0 + 4.0])] + pts  # costovertebral joint
            cart_pts = None
            if cart:  # costal cartilage: from the rib end up and in towards the xiphoid
                e = pts[-1]
                tip = np.array([sgn * (10.0 + 6.0 * j), e[1] + 10.0, levels["T6"] - 28.0 - 12.0 * j])
                tip[1] = wall_point(an, math.radians(80.0 if sgn > 0 else 100.0), tip[2], 0.5)[1]
                mid = 0.5 * (e + tip) + np.array([0.0, 6.0, 6.0])
                cart_pts = [e, mid, tip]
            out.append((np.array(pts), cart_pts))
    return out


def paint_ribs(an: Anatomy, cv: Canvas) -> None:
    """Ribs and costal cartilages (into muscle and fat only)."""
    for pts, cart in rib_paths(an):
        if pts[:, 2].max() < cv.zs[0] - 10 or pts[:, 2].min() > cv.zs[-1] + 10:
            continue
        p, r = spline(pts, np.full(len(pts), 5.0), 8.0)
        paint_bone_tube(cv, p, r)
        if cart is not None:
            p, r = spline(cart, [5.0, 4.5, 4.0], 6.0)
            sl = cv.box(p.min(0) - 8, p.max(0) + 8)
            if sl is None:
                continue
            d = tube(*cv.coords(sl), p, r, 3.0)
            t = cv.tissue[sl]
            t[(d < 0) & ((t == T["muscle"]) | (t == T["visceral_fat"]) | (t == T["fat"]))] = T["cartilage"]


def paint_bone_tube(cv: Canvas, p, r) -> None:
    """A tube of cortical bone with a cancellous core, into soft tissue."""
    sl = cv.box(p.min(0) - r.max() - 4, p.max(0) + r.max() + 4)
    if sl is None:
        return
    d = tube(*cv.coords(sl), p, r, 3.0)
    t = cv.tissue[sl]
    soft = (t == T["muscle"]) | (t == T["visceral_fat"]) | (t == T["fat"])
    t[(d < 0) & soft] = T["cortical_bone"]
    t[(d < -1.8) & soft] = T["cancellous_bone"]


def paint_pelvis(an: Anatomy, cv: Canvas) -> None:
    """Iliac wings (only in long fields of view)."""
    g = an.g
    zc = g["z_crest"]
    if cv.zs[0] > zc:
        return
    for sgn in (1.0, -1.0):
        c = np.array([sgn * (an.Wc * 0.42), an.y_vb + 18.0, zc + 10.0])
        sl = cv.box(c - [80, 90, 160], c + [80, 90, 0])
        if sl is None:
            continue
        xs, ys, zs = cv.coords(sl)
        e = eval_coarse(lambda x, y, z, c=c: ellipsoid(x, y, z, c, [70.0 * an.sx, 62.0, 150.0]), xs, ys, zs)
        Z = zs[None, None, :]
        X = xs[:, None, None]
        Y = ys[None, :, None]
        lateral = sgn * (X - c[0]) > -20.0 + 0.9 * np.maximum(Y - c[1], 0.0)  # open towards the front and midline
        sector = (Z < zc) & lateral & (Y < c[1] + 45.0 + 0.3 * (zc - Z))
        wing = sector & (np.abs(e) < 3.5 + 2.0 * smoothstep(zc - 20, zc - 100, Z))
        musc = sector & (e > -14.0) & (e < 25.0)  # iliacus inside the fossa, gluteal muscles outside
        t = cv.tissue[sl]
        soft = (t == T["muscle"]) | (t == T["visceral_fat"]) | (t == T["fat"])
        t[musc & (t == T["visceral_fat"])] = T["muscle"]
        t[wing & soft] = T["cancellous_bone"]
        t[wing & soft & (np.abs(e) > 2.0)] = T["cortical_bone"]
