"""The vessels: aorta and its branches, inferior vena cava with renal and iliac veins, the portal system and the
hepatic veins, as spline centre lines with radii placed from the anatomy's landmarks.

:func:`build_vessels` returns ``{group: [(points, radii), ...]}`` resampled along each path; the groups are the
labelled ``artery``, ``portal_vein`` and ``inferior_vena_cava``, the unlabelled ``caval_extra`` (renal and iliac veins)
and ``hepatic_vein`` (painted as liver).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tools.phantom.geometry import spline

if TYPE_CHECKING:
    from tools.phantom.anatomy import Anatomy


def build_vessels(an: Anatomy) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Every vessel path of one anatomy (needs its kidney hila, splenic hilum, porta hepatis and pancreas)."""
    g, sx, sy = an.g, an.sx, an.sy
    yA, yvb, zP, zR = an.y_A, an.y_vb, g["z_P"], g["z_R"]
    ra, ri, rp = g["aorta_r"], g["ivc_r"], g["pv_r"]
    xa = an.x_s - 14.0
    z_bif = g["z_crest"] + 8.0
    top = zR + 250.0

    def ya(z):  # aortic centre y following the lordosis
        return float(an.y_vb_at(z)) - yvb + yA

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
        ([cel_end, [15 * sx, yA + 32.0, zc + 2.0], list(an.porta + [0.0, 2.0, 4.0])], [3.2, 3.0, 2.6], 4.0)
    )
    sh = an.spleen_hilum
    wig = an.rng("splenic_artery").normal(0, 5.0, (4, 3))
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
        hil = an.kidney_info[side]["hilum"]
        via = [0.5 * (xa + hil[0]), yA - 6.0 if side == "R" else yA, zr - 2.0]
        V["artery"].append(([[xa, yA, zr], via, list(hil)], [3.2, 3.0, 2.8], 5.0))
    # inferior vena cava: right of the aorta, then forward into the bare area of the liver, up to the right atrium
    xi = an.x_s + 22.0
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
        hil = an.kidney_info[side]["hilum"]
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
    porta = an.porta
    V["portal_vein"].append(
        (
            [[14.0 * sx, yA + ra + 32.0, zP - 90.0], [12.0 * sx, yA + ra + 26.0, zP - 40.0], list(conf)],
            [rp * 0.8, rp * 0.85, rp],
            6.0,
        )
    )
    V["portal_vein"].append(([list(conf), list(0.5 * (conf + porta) + [0, -2.0, 0]), list(porta)], [rp, rp, rp], 5.0))
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
    pc = an.pancreas_ctrl
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
    return {k: [spline(p, r, st) for p, r, st in v] for k, v in V.items()}
