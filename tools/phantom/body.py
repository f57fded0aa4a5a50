"""The torso outline: skin (a super-ellipse per slice), subcutaneous fat, abdominal-wall muscle and the diaphragm."""

from __future__ import annotations

import numpy as np

from tools.phantom.geometry import smax, smoothstep


class Body:
    """Torso outline (a super-ellipse per slice), subcutaneous fat and abdominal-wall muscle thickness."""

    def __init__(self, g: dict):
        self.g = g

    def half_axes(self, z):
        g = self.g
        z = np.asarray(z, np.float32)
        top = smoothstep(g["z_R"] - 40.0, g["z_R"] + 60.0, z)
        pel = smoothstep(g["z_crest"] + 20.0, g["z_crest"] - 100.0, z)
        a = g["a"] * (1.0 + g["a_top"] * top + g["a_pel"] * pel)
        b = g["b"] * (1.0 + g["b_top"] * top + 0.5 * g["a_pel"] * pel)
        return a.astype(np.float32), b.astype(np.float32)

    def polar(self, X, Y):
        """theta, r and the 2D pieces of the outline (broadcast (nx, ny, 1))."""
        g = self.g
        th = np.arctan2(Y, X)
        r = np.sqrt(X * X + Y * Y)
        c, s = np.abs(np.cos(th)), np.sin(th)
        p = g["p_post"] + (g["p_ant"] - g["p_post"]) * smoothstep(-0.3, 0.3, s)
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
        f = f * (1.0 + 0.3 * smoothstep(0.0, -150.0, z) - 0.25 * smoothstep(g["z_R"] - 30, g["z_R"] + 40, z))
        return np.maximum(f, 3.0).astype(np.float32)

    def muscle(self, th, s, X, zs):
        g = self.g
        c = np.abs(np.cos(th))
        m = g["muscle"] * (0.8 + 0.35 * c)
        m = m * (1.0 - 0.75 * np.exp(-((X / 6.0) ** 2)) * (s > 0.5))  # linea alba
        z = np.asarray(zs, np.float32)[None, None, :]
        m = m * (1.0 + 1.2 * smoothstep(g["z_crest"], g["z_crest"] - 80.0, z) * c)  # gluteal muscles
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
        z = smax(right, left, 25.0)
        central = g["z_R"] - 24.0 - 0.004 * X**2 - 0.006 * dy2
        z = smax(z, central, 12.0)
        w = smoothstep(g["dome_y"], g["dome_y"] - 70.0, Y)
        floor = g["dome_floor_ant"] + (g["dome_floor_post"] - g["dome_floor_ant"]) * w
        return smax(z, floor, 12.0).astype(np.float32)

    def below_diaphragm(self, xs, ys, zs, t: float = 2.5) -> np.ndarray:
        zd = self.diaphragm_z(xs, ys)
        Z = np.asarray(zs, np.float32)[None, None, :]
        return (Z - (zd - t)) * np.float32(0.7)
