"""Every per-case number of a phantom, drawn from one generator in a fixed order.

:func:`sample_params` draws the anatomy (body size and shape, landmark heights, organ jitters, shapes and target
volumes, HU of every tissue in every phase) and the acquisition (phase, orientation, noise, blur, grid); overrides are
applied afterwards by the caller, so they never shift a draw.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tools.phantom.acquisition import ORIENTATIONS, PHASES
from tools.phantom.tissues import TISSUE_HU, TISSUE_NAMES

#: Calibration targets (ml): (low, high) drawn, times a body-size factor 0.8-1.25 when scaled, clipped to
#: (min, max). Inside the ranges of real CTs (REFERENCE.md) with room for what later structures carve out.
TARGET_ML = {
    "liver": (1100.0, 1400.0, 1100.0, 1600.0, True),
    "spleen": (145.0, 225.0, 138.0, 245.0, True),
    "kidney": (105.0, 155.0, 90.0, 170.0, True),
    "stomach": (170.0, 300.0, 145.0, 340.0, True),
    "gallbladder": (39.0, 51.0, 39.0, 51.0, False),
    "pancreas": (72.0, 98.0, 66.0, 106.0, True),
}


def _u(rng, lo, hi) -> float:
    return float(rng.uniform(lo, hi))


def sample_params(rng: np.random.Generator, cfg: dict) -> dict:
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
    for k, (lo_v, hi_v, lo_c, hi_c, scaled) in TARGET_ML.items():
        targets[k] = float(np.clip(_u(rng, lo_v, hi_v) * (q if scaled else 1.0), lo_c, hi_c))
    targets["kidney_R"] = targets["kidney"] * _u(rng, 0.9, 1.05)
    targets["kidney_L"] = targets.pop("kidney") * _u(rng, 0.95, 1.1)
    g["targets_ml"] = targets
    # acquisition
    phase = str(rng.choice(list(PHASES), p=list(PHASES.values())))
    hu = {}
    for name in TISSUE_NAMES:
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
