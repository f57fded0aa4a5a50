"""The anatomy of one case: landmarks and organ positions from the drawn numbers, then vessels, gut and organs.

Geometry is built in a canonical patient frame in millimetres: +x patient right, +y anterior, +z superior (RAS),
origin at the centre of the torso at about the L1/L2 level. Organs are placed relative to the spine and the body wall.
"""

from __future__ import annotations

import numpy as np

from tools.phantom.body import Body
from tools.phantom.geometry import BIG, Field, child_rng, frame, smoothstep, unit
from tools.phantom.gut import build_gut
from tools.phantom.organs import build_organs
from tools.phantom.vessels import build_vessels


class Anatomy:
    """Every structure of one case, built from its drawn numbers: landmarks, positions, vessels, gut and organs.

    ``render.render`` paints it on a canvas. Attributes other modules read: the landmarks (``Wc``, ``Dc`` cavity
    half-width and front, ``sx``, ``sy`` their scale, ``y_c``, ``y_vb``, ``y_A`` spinal canal, vertebral body and aorta
    centre y, ``x_s`` spine x, ``fat_post``), the positions (``kidney_info``, ``spleen_info``, ``spleen_hilum``,
    ``pancreas_ctrl``, ``stomach_ctrl``, ``porta``, ``pylorus``, ``ge_junction``), ``vessels``, ``gut`` and ``organs``.
    """

    def __init__(self, seed: int, g: dict):
        self.seed, self.g = seed, g
        self.body = Body(g)
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
        self._place()
        self.vessels = build_vessels(self)
        self.gut = build_gut(self)
        self.organs = build_organs(self)

    # -- helpers
    def rng(self, name):
        return child_rng(self.seed, name)

    def organ_field(self, name, lo, hi, step):
        return Field(self.rng(name), np.asarray(lo) - 40, np.asarray(hi) + 40, step)

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
        grow = 1.0 + 0.15 * smoothstep(zL1 + 40, zL1 - 60, Z)
        sa, sb, cy = 54.0 * grow, 27.0, self.y_c - 16.0
        rho = ((X / sa) ** 2.4 + (np.abs(Y - cy) / sb) ** 2.4) ** (1 / 2.4)
        d = (rho - 1.0) * sb
        zT12 = zL1 + 28.0
        r_ps = 3.0 + 19.0 * smoothstep(zT12, zL1 - 110.0, Z)
        ps_x = 24.0 + 0.9 * r_ps
        ps_y = self.y_vb_at(zs).astype(np.float32)[None, None, :] + 2.0 + 0.25 * r_ps
        d_ps = np.sqrt(((X - ps_x) / 1.1) ** 2 + (Y - ps_y) ** 2) - r_ps
        d = np.minimum(d, np.where(Z < zT12, d_ps, BIG))
        rho_q = np.sqrt(((X - 58.0 * self.sx) / 20.0) ** 2 + ((Y - (self.y_vb - 24.0)) / 10.0) ** 2)
        ql_on = (Z < zL1 + 10.0) & (Z > g["z_crest"] - 10.0)
        d = np.minimum(d, np.where(ql_on, (rho_q - 1.0) * 10.0, BIG))
        if spine:
            d_sp = (np.sqrt((X / 30.0) ** 2 + ((Y - (self.y_vb - 12.0)) / 44.0) ** 2) - 1.0) * 30.0
            d = np.minimum(d, d_sp)
        return d.astype(np.float32)

    def liver_edge_z(self, x):
        g = self.g
        cRx = 72.0 * self.sx
        # where the inferior plane of the liver crosses x (plane through (cRx + 60 sx, ., zP - 48 - tip))
        return g["z_P"] - 48.0 - g["liver_tip"] + 0.42 * ((cRx + 60.0 * self.sx) - x)

    def _place(self):
        """Where the organs sit: kidneys, spleen, pancreas, porta hepatis, stomach (before any shape is built)."""
        g, sx, sy = self.g, self.sx, self.sy
        yA, yvb, zP, zL = self.y_A, self.y_vb, g["z_P"], g["z_L"]
        Wc = self.Wc
        # ---- positions -------------------------------------------------------------------------------------------
        kid = {}
        for side, sgn in (("R", 1.0), ("L", -1.0)):
            d = np.asarray(g[f"d_kidney_{side}"])
            zc = (zP - 20.0 if side == "R" else zP - 4.0) + d[2]
            c = np.array([sgn * 76.0 * sx + 0.6 * d[0], yvb + 8.0 + 0.4 * d[1], zc])
            axis = np.array([-sgn * g["kidney_tilt"], -0.3, 1.0])  # upper pole medial and posterior
            rot = frame(axis, [0.0, 1.0, 0.0])
            hd = unit([-sgn * 1.0, 0.9, 0.0])  # the hilum faces anteromedially
            kid[side] = {"c": c, "rot": rot, "hd": hd, "hilum": c + hd * 24.0, "sgn": sgn}
        self.kidney_info = kid
        d = np.asarray(g["d_spleen"])
        c_sp = np.array([-(Wc - 42.0) + 0.6 * d[0], yvb + 12.0 + d[1], zL - 52.0 + d[2]])
        rot_sp = frame([-0.25, 0.55 + g["spleen_tilt"], -0.8], [-0.8, -0.5, 0.0])  # v ~ lateral-posterior normal
        inward = -rot_sp[:, 1]
        self.spleen_info = {"c": c_sp, "rot": rot_sp, "inward": inward}
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
        self.stomach_ctrl = st_ctrl = np.array(
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
