"""Rendering: the canvas (the voxel grid with its tissue and owner maps), the painting of every structure in order,
and the label map from the owner map.

Each structure is evaluated only in its bounding box, at voxel centres (the label map is the geometric truth; the
image is blurred afterwards by ``tools.phantom.acquisition``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tools.phantom.geometry import Field, ellipsoid, eval_coarse, frame, smoothstep, spline, tube
from tools.phantom.gut import bowel_paths
from tools.phantom.organs import ORGANS, Organ, OrganSpec
from tools.phantom.pelvis import paint_pelvic_organs
from tools.phantom.skeleton import paint_pelvis, paint_ribs, paint_spine
from tools.phantom.tissues import OWN, OWNERS, VESSEL_PROTECTED, T

if TYPE_CHECKING:
    from tools.phantom.anatomy import Anatomy

# ------------------------------------------------------------------------------------------------------- canvas


class Canvas:
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
        return (self.tissue[sl] == T["visceral_fat"]) | (self.owner[sl] == OWN["small_bowel"])

    def vessel_ok(self, sl) -> np.ndarray:
        return ~VESSEL_PROTECTED[self.tissue[sl]]


# ----------------------------------------------------------------------------------------------------- painting


def render(an: Anatomy, cv: Canvas) -> None:
    """Paint every structure of ``an`` on ``cv``, each over what came before (the order is part of the anatomy)."""
    paint_table(an, cv)
    paint_body(an, cv)
    paint_back_muscles(an, cv)
    paint_spine(an, cv)
    paint_ribs(an, cv)
    paint_pelvis(an, cv)
    paint_thorax(an, cv)
    paint_small_bowel(an, cv)
    paint_organs(an, cv)
    paint_gi_tubes(an, cv)
    paint_pelvic_organs(an, cv)  # only in fields of view that reach the pelvis (``varied`` preset)
    paint_vessels(an, cv)


def paint_table(an: Anatomy, cv: Canvas) -> None:
    """Table: a curved carbon-fibre plate (two thin dense skins around foam) below the body, separated by air."""
    g = an.g
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


def paint_body(an: Anatomy, cv: Canvas) -> None:
    """Skin, fat, abdominal wall, cavity."""
    body = an.body
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


def paint_back_muscles(an: Anatomy, cv: Canvas) -> None:
    """Erector spinae, psoas, quadratus lumborum."""
    sl = cv.box([an.x_s - 130, an.y_c - 60, -1e4], [an.x_s + 130, an.y_vb + 40, 1e4])
    if sl is None:
        return
    xs, ys, zs = cv.coords(sl)
    m = an.back_sdf(xs, ys, zs, spine=False) < 0
    m &= an.body.depth(xs, ys, zs) > an.fat_post + 1.0
    t = cv.tissue[sl]
    ok = (t == T["visceral_fat"]) | (t == T["muscle"]) | (t == T["fat"])
    t[m & ok] = T["muscle"]


def paint_thorax(an: Anatomy, cv: Canvas) -> None:
    """Diaphragm, lungs, mediastinum, heart."""
    g, body = an.g, an.body
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
    xa = an.x_s - 14.0
    med = (X > xa - 34.0) & (X < an.x_s + 24.0) & (Y > an.y_vb - 8.0)  # posterior mediastinum
    hxy = [g["heart_x"], an.y_A + 62.0 * an.sy]
    hc = np.array([hxy[0], hxy[1], float(body.diaphragm_z([hxy[0]], [hxy[1]]).ravel()[0]) + 58.0])
    rot = frame([0.5, 0.45, 0.75], [0.0, 1.0, 0.0])
    hsd = eval_coarse(lambda x, y, z: ellipsoid(x, y, z, hc, [58.0, 48.0, 78.0], rot), xs, ys, zs)
    heart = (hsd < 0) & above & cavity
    lung = above & cavity & ~med & (hsd > 4.0)
    t[dia] = T["muscle"]
    t[lung] = T["lung"]
    t[heart] = T["myocardium"]
    t[heart & (hsd < -9.0)] = T["heart_blood"]
    o[heart] = OWN["heart"]


def paint_small_bowel(an: Anatomy, cv: Canvas) -> None:
    body = an.body
    paths = bowel_paths(an)
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
    y_peri = an.y_A + 16.0 - 42.0 * smoothstep(35.0, 95.0 * an.sx, np.abs(X))
    ok = (Y > y_peri) & (body.below_diaphragm(xs, ys, zs, 10.0) < 0) & (cv.tissue[sl0] == T["visceral_fat"])
    for k in (an.organs["kidney_right"], an.organs["kidney_left"]):
        ks = cv.box(*k.box())
        if ks is None:
            continue
        ks = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(ks, sl0, strict=False))
        if any(a.stop <= a.start for a in ks):
            continue
        rel = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(ks, sl0, strict=False))
        sub = ok[rel]
        sub &= eval_coarse(k.sdf, *cv.coords(ks)) > 14.0
    G = Field(an.rng("bowel_gas"), lo_f, hi_f, 10.0)
    own = OWN["small_bowel"]

    def where(sl):
        rel = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sl, sl0, strict=False))
        return ok[rel] | (cv.owner[sl] == own)

    for pts, radius, kind in paths:
        p, r = spline(pts, np.full(len(pts), radius), 6.0)
        p = np.clip(p, lo_f + 1, hi_f - 1)
        if kind == "collapsed":
            paint_tube(cv, p, r, where, T["gi_wall"], own)
            continue
        res = paint_tube(cv, p, r, where, T["gi_wall"], own, 2.2, T["gi_fluid"])
        if res is not None and kind == "gas":
            sl, d, m = res
            gas = m & (d < -2.2) & (G(*cv.coords(sl)) > -0.2)
            cv.paint(sl, gas, T["gas"], own)


def paint_organ(cv: Canvas, org: Organ):
    """The organ's box on the canvas, and there its signed distance and the free voxels it takes."""
    sl = cv.box(*org.box())
    if sl is None:
        return None, None
    d = eval_coarse(org.sdf, *cv.coords(sl))
    return sl, (d, (d < 0) & cv.free(sl))


def _paint_kidney(an: Anatomy, cv: Canvas, spec: OrganSpec, org: Organ, sl, d, mask) -> None:
    """Cortex rim, medulla (pyramids) inside, pelvis in the sinus fat at the hilum."""
    side = spec.key[-1]
    xs, ys, zs = cv.coords(sl)
    k = an.kidney_info[side]
    s = org.s
    pelvis = eval_coarse(
        lambda x, y, z, k=k, s=s: ellipsoid(
            x, y, z, k["c"] + k["hd"] * 16.0 * s, np.array([7.0, 6.0, 14.0]) * s, k["rot"]
        ),
        xs,
        ys,
        zs,
    )
    pyr = Field(an.rng(f"pyramids_{side}"), k["c"] - 80, k["c"] + 80, 7.0)(xs, ys, zs)
    own = OWN[org.name]
    cv.paint(sl, mask, T["kidney_cortex"], own)
    cv.paint(sl, mask & (d < -6.5 * s) & (pyr > -0.3), T["kidney_medulla"], own)
    cv.paint(sl, (pelvis < 0) & cv.free(sl), T["urine"], own)


def _paint_stomach(an: Anatomy, cv: Canvas, spec: OrganSpec, org: Organ, sl, d, mask) -> None:
    """Wall, contents (fluid or food, dependent = posterior) and air (non-dependent = anterior)."""
    g = an.g
    xs, ys, zs = cv.coords(sl)
    own = OWN[org.name]
    cv.paint(sl, mask, T["gi_wall"], own)
    lumen = mask & (d < -4.0)
    cv.paint(sl, lumen, T["stool"] if g["stomach_food"] else T["gi_fluid"], own)
    lum_y = np.broadcast_to(ys[None, :, None], d.shape)[lumen]
    if lum_y.size:
        y_air = np.quantile(lum_y, 1.0 - 0.35 * g["stomach_air"])
        cv.paint(sl, lumen & (ys[None, :, None] > y_air), T["gas"], own)


def _paint_gallbladder(an: Anatomy, cv: Canvas, spec: OrganSpec, org: Organ, sl, d, mask) -> None:
    """Thin enhancing wall, bile."""
    cv.paint(sl, mask, T["gallbladder_wall"], OWN[org.name])
    cv.paint(sl, mask & (d < -2.0), T["bile"], OWN[org.name])


def _paint_solid(an: Anatomy, cv: Canvas, spec: OrganSpec, org: Organ, sl, d, mask) -> None:
    """One tissue, the organ's own (liver, spleen, pancreas)."""
    cv.paint(sl, mask, T[org.name], OWN[org.name])


#: ``OrganSpec.paint`` -> painter of the organ's interior.
ORGAN_PAINTERS: dict[str, Callable] = {
    "kidney": _paint_kidney,
    "stomach": _paint_stomach,
    "gallbladder": _paint_gallbladder,
    "solid": _paint_solid,
}


def paint_organs(an: Anatomy, cv: Canvas, specs: Sequence[OrganSpec] = ORGANS) -> None:
    """The organs of the table, in its order, each into the voxels still free (visceral fat, small bowel)."""
    for spec in specs:
        org = an.organs[spec.name]
        sl, res = paint_organ(cv, org)
        if sl is not None:
            ORGAN_PAINTERS[spec.paint](an, cv, spec, org, sl, *res)


def paint_tube(cv, pts, rad, where, tissue, owner, wall=None, lumen_tissue=None, pad=4.0):
    sl = cv.box(pts.min(0) - rad.max() - pad, pts.max(0) + rad.max() + pad)
    if sl is None:
        return None
    step = min(1.4, float(rad.min()) / 2.5)
    d = eval_coarse(lambda x, y, z: tube(x, y, z, pts, rad, pad), *cv.coords(sl), step=step)
    m = (d < 0) & where(sl)
    cv.paint(sl, m, tissue, owner)
    if wall is not None:
        cv.paint(sl, m & (d < -wall), lumen_tissue, owner)
    return sl, d, m


def paint_gi_tubes(an: Anatomy, cv: Canvas) -> None:
    g = an.g
    # duodenum: fluid with a little gas
    pts, rad = an.gut["duodenum"]
    res = paint_tube(cv, pts, rad, cv.free, T["gi_wall"], OWN["duodenum"], 2.5, T["gi_fluid"])
    if res is not None:
        sl, d, m = res
        G = Field(an.rng("duodenum_gas"), pts.min(0) - 30, pts.max(0) + 30, 12.0)(*cv.coords(sl))
        cv.paint(sl, m & (d < -2.5) & (G > 1.5), T["gas"], OWN["duodenum"])
    # colon: stool with gas bubbles, gas anteriorly (non-dependent)
    pts, rad = an.gut["colon"]
    res = paint_tube(cv, pts, rad, cv.free, T["gi_wall"], OWN["colon"], 2.0, T["stool"])
    if res is not None:
        sl, d, m = res
        xs, ys, zs = cv.coords(sl)
        G = Field(an.rng("colon_gas"), pts.min(0) - 40, pts.max(0) + 40, 14.0)(xs, ys, zs)
        gas = m & (d < -2.0) & (G + 0.012 * (ys[None, :, None] - an.y_A) > 1.6 - g["bowel_gas"])
        cv.paint(sl, gas, T["gas"], OWN["colon"])


def paint_vessels(an: Anatomy, cv: Canvas) -> None:
    """Vessels."""
    ok = cv.vessel_ok
    for key, tissue in (
        ("inferior_vena_cava", "caval_blood"),
        ("portal_vein", "portal_blood"),
        ("artery", "arterial_blood"),
    ):
        for pts, rad in an.vessels[key]:
            paint_tube(cv, pts, rad, ok, T[tissue], OWN[key])
    for pts, rad in an.vessels["caval_extra"]:  # renal and iliac veins: drawn, never labelled
        paint_tube(cv, pts, rad, ok, T["caval_blood"], 0)

    def in_liver(sl):
        return cv.owner[sl] == OWN["liver"]

    for pts, rad in an.vessels["hepatic_vein"]:
        paint_tube(cv, pts, rad, in_liver, T["hepatic_vein"], OWN["liver"])
    pts, rad = an.gut["esophagus"]  # muscular wall with a little air centrally
    res = paint_tube(cv, pts, rad, ok, T["muscle"], OWN["esophagus"])
    if res is not None:
        sl, d, m = res
        cv.paint(sl, m & (d < -6.5), T["gas"], OWN["esophagus"])


# ---------------------------------------------------------------------------------------------------- label map


def labels_from_owner(owner: np.ndarray, labels: dict[str, int]) -> np.ndarray:
    """Owner map -> label ids of ``labels`` ({structure: id}); structures outside it get 0."""
    lut = np.zeros(256, np.uint8)
    for name, i in labels.items():
        lut[OWN[name]] = i
    return lut[owner]


def volumes_ml(owner: np.ndarray, spacing) -> dict[str, float]:
    """Volume (ml, 2 decimals) of every owner structure."""
    counts = np.bincount(owner.ravel(), minlength=len(OWNERS) + 1)
    vox_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    return {name: round(float(counts[OWN[name]]) * vox_ml, 2) for name in OWNERS}
