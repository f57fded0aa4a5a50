"""The labelled organs: a table of organ specs, the shape functions it names, and the calibratable organ it builds.

Each row of :data:`ORGANS` says how an organ's undeformed shape follows from the anatomy's landmarks (a shape
function below), how it is deformed (smooth random fields), what it is clipped to (the abdominal cavity, the space
below the diaphragm, the back muscles), what it keeps its distance from (organs higher up the table, vessel groups)
and how its interior is painted (``tools.phantom.render``). :func:`build_organs` builds the rows in order and then
calibrates each, in the same order, to its drawn volume: an organ is calibrated against the final shapes of what it
excludes, so a row may exclude only rows above it.

Adding an organ: a shape function, a row (below what it excludes; give it ``clips`` and ``excl`` so it cannot
overlap its neighbours), a volume range in ``params.TARGET_ML`` and its name in ``custom.labels.STRUCTURES``. A new
drawn number changes every later draw: bump ``GENERATOR_VERSION`` and the recorded hashes of ``tests/test_phantom*``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from tools.phantom.geometry import BIG, Field, ellipsoid, frame, plane, smax, smin, spline, tube

if TYPE_CHECKING:
    from tools.phantom.anatomy import Anatomy


class Organ:
    """A calibratable shape: ``core(xs, ys, zs, s)`` is a signed distance at scale s; clips and exclusions follow."""

    def __init__(
        self,
        name: str,
        core: Callable,
        bounds: Callable,
        *,
        field: Field | None = None,
        amp: float = 0.0,
        fine: Field | None = None,
        fine_amp: float = 0.0,
        clips: Sequence[Callable] = (),
        excl: Sequence[tuple[Organ, float]] = (),
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
        static = np.full(extra.shape, -BIG, np.float32)
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


def implicit(center, extent, fn):
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


def tube_core(ctrl, radii, step: float = 6.0, pad: float = 10.0):
    pts, rad = spline(ctrl, radii, step)

    def core(xs, ys, zs, s):
        return tube(xs, ys, zs, pts, rad * s, pad)

    def bounds(s):
        r = rad.max() * s + pad
        return pts.min(0) - r, pts.max(0) + r

    return core, bounds, pts, rad


def tube_organ(name: str, pts, rad, pad: float = 8.0) -> Organ:
    """A vessel as an organ other organs keep their distance from (never calibrated)."""

    def core(xs, ys, zs, s):
        return tube(xs, ys, zs, pts, rad * s, pad)

    def bounds(s):
        r = rad.max() * s + pad
        return pts.min(0) - r, pts.max(0) + r

    return Organ(name, core, bounds)


# ---------------------------------------------------------------------------------------------------------- shapes


class Shape(NamedTuple):
    """An undeformed shape: ``core(xs, ys, zs, s)``, ``bounds(s) -> (lo, hi)`` and the centre its field is drawn
    around (None: around ``bounds`` at the spec's scale)."""

    core: Callable
    bounds: Callable
    centre: np.ndarray | None = None


def kidney_shape(side: str) -> Callable[[Anatomy], Shape]:
    """Bean: an ellipsoid with a notch at the hilum and the renal sinus hollowed out."""

    def build(an: Anatomy) -> Shape:
        k = an.kidney_info[side]
        c, rot, hd = k["c"], k["rot"], k["hd"]

        def fn(xs, ys, zs, c=c, rot=rot, hd=hd):
            e = ellipsoid(xs, ys, zs, c, [28.0, 24.0, 57.0], rot)
            notch = ellipsoid(xs, ys, zs, c + hd * 30.0, [13.0, 13.0, 22.0], rot)
            sinus = ellipsoid(xs, ys, zs, c + hd * 13.0, [11.0, 10.0, 30.0], rot)
            return smax(smax(e, -notch, 4.0), -sinus, 2.0)

        return Shape(*implicit(c, [64, 64, 64], fn), centre=c)

    return build


def pancreas_shape(an: Anatomy) -> Shape:
    """Head in the duodenal C-loop, neck in front of the portal confluence, body and tail to the splenic hilum."""
    core, bounds, _, _ = tube_core(an.pancreas_ctrl, [17, 15, 10.5, 11, 10, 9, 7.5], step=5.0)
    return Shape(core, bounds)


def stomach_shape(an: Anatomy) -> Shape:
    """Fundus under the left dome, body along the greater curvature, antrum to the pylorus."""
    core, bounds, _, _ = tube_core(an.stomach_ctrl, [33, 31, 28, 23, 19, 14, 8])
    return Shape(core, bounds)


def gallbladder_shape(an: Anatomy) -> Shape:
    """Fundus just below the inferior edge of the liver, neck up towards the porta hepatis."""
    g, sx, sy = an.g, an.sx, an.sy
    d = np.asarray(g["d_gallbladder"])
    z_edge = an.liver_edge_z(50.0 * sx)
    fundus = np.array([52.0 * sx + d[0], an.Dc - 28.0 + 0.5 * d[1], z_edge + 2.0 + 0.5 * d[2]])
    neck = np.array([36.0 * sx, an.y_A + 48.0 * sy, fundus[2] + 48.0])
    mid = fundus + 0.45 * (neck - fundus) + np.array([4.0, -4.0, -6.0])
    core, bounds, _, _ = tube_core([fundus, mid, neck + (fundus - neck) * 0.12, neck], [16, 15, 10, 5], step=4.0)
    return Shape(core, bounds)


def spleen_shape(an: Anatomy) -> Shape:
    """An ellipsoid hollowed on its visceral side (the hilum faces the stomach and the left kidney)."""
    sp = an.spleen_info

    def fn(xs, ys, zs, c=sp["c"], rot=sp["rot"], inward=sp["inward"]):
        e = ellipsoid(xs, ys, zs, c, [40.0, 24.0, 62.0], rot)
        hollow = ellipsoid(xs, ys, zs, c + inward * 36.0, [36.0, 22.0, 50.0], rot)
        return smax(e, -hollow, 6.0)

    return Shape(*implicit(sp["c"], [70, 70, 70], fn), centre=sp["c"])


def liver_shape(an: Anatomy) -> Shape:
    """Right lobe under the right dome smoothly joined to the left lobe, cut by a curved inferior (visceral) surface."""
    g, sx, sy = an.g, an.sx, an.sy
    zP, zR = g["z_P"], g["z_R"]
    d = np.asarray(g["d_liver"])
    cR = np.array([72.0 * sx + d[0], 0.5 * (an.y_vb + an.Dc) + 8.0 + d[1], zR - 72.0 + d[2]])
    cL = np.array([-22.0 * sx + d[0], an.Dc - 36.0 + 0.5 * d[1], zR - 58.0 + d[2]])
    ll = g["liver_left"]
    rotL = frame([0.0, 0.15, 1.0], [0.0, 1.0, 0.0])
    tip = g["liver_tip"]

    def fn(xs, ys, zs, cR=cR, cL=cL, ll=ll, rotL=rotL, tip=tip):
        right = ellipsoid(xs, ys, zs, cR, [92.0 * sx, 88.0 * sy, 95.0], None)
        left = ellipsoid(xs, ys, zs, cL, [82.0 * sx * ll, 38.0, 46.0 * (0.8 + 0.2 * ll)], rotL)
        d0 = smin(right, left, 25.0)
        # inferior (visceral) surface slants up from the right lateral tip to the left lobe
        # (curved: a plane would leave straight edges in axial slices)
        p = np.array([cR[0] + 60.0 * sx, cR[1], zP - 48.0 - tip])
        cut = plane(xs, ys, zs, p, [0.42, 0.12, -1.0])
        yy = (np.asarray(ys, np.float32) - np.float32(cR[1] + 10.0))[None, :, None]
        xx = (np.asarray(xs, np.float32) - np.float32(p[0]))[:, None, None]
        cut = cut - np.float32(0.006) * yy**2 + np.float32(0.0012) * xx**2
        return smax(d0, cut, 10.0)

    return Shape(*implicit((cR + cL) / 2, [190, 130, 130], fn))


# ----------------------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class OrganSpec:
    """One labelled organ.

    name: its owner name (``custom.labels.STRUCTURES``); key: its name in the drawn numbers (target volume) and the
    name of its random fields; shape: the shape function; field: (lattice step, amplitude) in mm of the smooth
    deformation; field_box: the box that field covers, ``("centre", half-size mm)`` around the shape's centre or
    ``("bounds", scale)`` the shape's bounds at that scale (both widened by 40 mm); fine: a second, finer deformation
    (lobules: field ``<key>_lobules``); clips: ``cavity`` (inside the abdominal wall), ``below`` (below the
    diaphragm), ``back`` (in front of the back muscles and the spine); excl: (organ above or vessel group, margin mm)
    pairs it stays that far from; paint: how ``render`` paints its interior.
    """

    name: str
    key: str
    shape: Callable[[Anatomy], Shape]
    field: tuple[float, float]
    field_box: tuple[str, float]
    fine: tuple[float, float] | None = None
    clips: tuple[str, ...] = ("cavity", "back")
    excl: tuple[tuple[str, float], ...] = ()
    paint: str = "solid"


#: The vessel groups organs may exclude (``Anatomy.vessels`` keys).
VESSEL_GROUPS: tuple[str, ...] = ("inferior_vena_cava", "artery", "portal_vein")

#: The organs in build, calibration and painting order.
ORGANS: tuple[OrganSpec, ...] = (
    OrganSpec("kidney_right", "kidney_R", kidney_shape("R"), (30.0, 2.5), ("centre", 70.0), paint="kidney"),
    OrganSpec("kidney_left", "kidney_L", kidney_shape("L"), (30.0, 2.5), ("centre", 70.0), paint="kidney"),
    OrganSpec(
        "pancreas", "pancreas", pancreas_shape, (25.0, 2.5), ("bounds", 1.4), fine=(6.0, 1.2),
        excl=(("portal_vein", 1.0),),
    ),
    OrganSpec(
        "stomach", "stomach", stomach_shape, (35.0, 4.0), ("bounds", 1.5), clips=("cavity", "below", "back"),
        excl=(("pancreas", 2.5),), paint="stomach",
    ),
    OrganSpec(
        "gallbladder", "gallbladder", gallbladder_shape, (25.0, 2.0), ("bounds", 1.4), clips=("cavity",),
        excl=(("pancreas", 2.0),), paint="gallbladder",
    ),
    OrganSpec(
        "spleen", "spleen", spleen_shape, (30.0, 4.0), ("centre", 80.0), clips=("cavity", "below", "back"),
        excl=(("stomach", 4.0), ("kidney_left", 5.0), ("pancreas", 2.0)),
    ),
    OrganSpec(
        "liver", "liver", liver_shape, (32.0, 8.0), ("bounds", 1.4), clips=("cavity", "below", "back"),
        excl=(("kidney_right", 6.0), ("stomach", 3.0), ("gallbladder", 1.5), ("pancreas", 4.0))
        + tuple((v, -0.5) for v in VESSEL_GROUPS),  # vessels painted later carve the liver: calibrate without them
    ),
)  # fmt: skip


def build_organs(an: Anatomy, specs: Sequence[OrganSpec] = ORGANS) -> dict[str, Organ]:
    """Build the organs of ``specs`` for one anatomy and calibrate them (in order) to its target volumes."""
    g, body = an.g, an.body

    def below(xs, ys, zs):
        return body.below_diaphragm(xs, ys, zs, 3.0)

    def back(xs, ys, zs):
        return 2.0 - an.back_sdf(xs, ys, zs)

    clips = {"cavity": body.cavity, "below": below, "back": back}
    vessels = {k: [tube_organ(k, p, r) for p, r in an.vessels[k]] for k in VESSEL_GROUPS}
    organs: dict[str, Organ] = {}
    for spec in specs:
        core, bounds, centre = spec.shape(an)
        kind, size = spec.field_box
        if kind == "centre":
            lo, hi = centre - size, centre + size
        elif kind == "bounds":
            lo, hi = bounds(size)
        else:
            raise ValueError(
                f"{spec.name}: field_box must be ('centre', mm) or ('bounds', scale), got {spec.field_box}"
            )
        step, amp = spec.field
        fine, fine_amp = None, 0.0
        if spec.fine is not None:
            fine, fine_amp = an.organ_field(f"{spec.key}_lobules", lo, hi, spec.fine[0]), spec.fine[1]
        excl = []
        for other, margin in spec.excl:
            if other in vessels:
                excl += [(v, margin) for v in vessels[other]]
            elif other in organs:
                excl.append((organs[other], margin))
            else:
                raise ValueError(f"{spec.name} excludes {other!r}, which is neither a vessel group nor an organ above")
        organs[spec.name] = Organ(
            spec.name, core, bounds, field=an.organ_field(spec.key, lo, hi, step), amp=amp, fine=fine,
            fine_amp=fine_amp, clips=[clips[c] for c in spec.clips], excl=excl,
        )  # fmt: skip
    limit = (
        np.array([-g["a"] * 1.1, -g["b"] * 1.1, g["z_crest"] - 100.0]),
        np.array([g["a"] * 1.1, g["b"] * 1.1, g["z_R"] + 10.0]),
    )
    for spec in specs:
        organs[spec.name].calibrate(g["targets_ml"][spec.key], limit=limit)
    return organs
