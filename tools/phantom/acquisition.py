"""The acquisition: presets, the voxel grid (matrix, spacing, field of view, orientation) and the image (HU per
tissue, texture, partial-volume blur, correlated noise, reconstruction circle).

The anatomy is drawn in a canonical RAS frame in millimetres; :func:`resolve_grid` places the voxel centres over it,
:func:`hu_image` turns the painted tissue map into an int16 CT, and :func:`orient` stores both arrays in the drawn
voxel order with the affine that says so.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from tools.phantom.geometry import Field, child_rng, smoothstep
from tools.phantom.tissues import TEXTURE, TISSUE_NAMES, T

if TYPE_CHECKING:
    from tools.phantom.render import Canvas

#: Contrast phases and the probability with which a case draws each.
PHASES: dict[str, float] = {"native": 0.2, "arterial": 0.25, "portal_venous": 0.55}

#: Orientations a case draws from (codes as ``nibabel.aff2axcodes`` gives them).
ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS")

#: Grid presets. ``spacing``: in-plane range (mm); ``slice_spacing``: the values a case draws from (mm);
#: ``z_extent``: field-of-view length range (mm), raised where the organs need more; ``max_slices``: memory guard.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "matrix": 512,
        "spacing": (0.6, 0.9),
        "slice_spacing": (0.5, 0.625, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5),
        "z_extent": (200.0, 400.0),
        "max_slices": 600,
    },
    "demo": {
        "matrix": 128,
        "spacing": (2.4, 3.6),
        "slice_spacing": (2.5, 3.0, 3.5, 4.0, 5.0),
        "z_extent": (240.0, 330.0),
        "max_slices": 160,
    },
    "varied": {  # the demo grid with the variety of ``tools.phantom.variety`` (fields of view, contrast, texture)
        "matrix": 128,
        "spacing": (2.4, 3.6),
        "slice_spacing": (2.5, 3.0, 3.5, 4.0, 5.0),
        "z_extent": (240.0, 330.0),
        "max_slices": 200,
        "variety": True,
    },
    "tiny": {
        "matrix": 64,
        "spacing": (5.5, 7.0),
        "slice_spacing": (6.0, 7.0, 8.0),
        "z_extent": (240.0, 300.0),
        "max_slices": 48,
    },
}

#: Overrides ``generate_phantom`` accepts, with what they replace.
OVERRIDES: dict[str, str] = {
    "matrix": "in-plane matrix size: int or (nx, ny)",
    "spacing": "in-plane spacing in mm (float), or (sx, sy, sz)",
    "slice_spacing": "slice spacing in mm",
    "n_slices": "number of slices (the field of view keeps its top and grows or shrinks at the bottom)",
    "z_extent": "field-of-view length in mm (ignored when n_slices is given)",
    "orientation": "voxel orientation code, one of RAS, LAS, LPS, RPS, RAI, LAI, RPI, LPI",
    "phase": f"contrast phase, one of {list(PHASES)}",
    "noise_std": "CT noise standard deviation in HU",
    "recon_circle": "True: voxels outside the reconstruction circle are -2048 HU, as some scanners write them",
}


def orientation_flips(code: str) -> tuple[bool, bool, bool]:
    code = code.upper()
    allowed = {"R": False, "L": True}, {"A": False, "P": True}, {"S": False, "I": True}
    if len(code) != 3 or any(c not in a for c, a in zip(code, allowed, strict=False)):
        raise ValueError(
            f"orientation must be one of RAS, LAS, LPS, RPS, RAI, LAI, RPI, LPI (no axis swaps), got {code!r}"
        )
    return tuple(a[c] for c, a in zip(code, allowed, strict=False))


def resolve_grid(acq: dict, a_half: float, cfg: dict, overrides: dict, g: dict, anatomy_span: tuple[float, float]):
    """Matrix, spacing, slice count and canonical voxel centres from the preset, the body and the overrides."""
    m = overrides.get("matrix", cfg["matrix"])
    nx, ny = (int(m), int(m)) if np.isscalar(m) else (int(m[0]), int(m[1]))
    lo, hi = cfg["spacing"]
    sxy = float(np.clip(2.0 * a_half * acq["fov_fill"] / nx, lo, hi))
    sz = float(acq["slice_spacing"])
    if "slice_spacing" in overrides:
        sz = float(overrides["slice_spacing"])
    if "spacing" in overrides:
        sp = overrides["spacing"]
        if np.isscalar(sp):
            sxy = float(sp)
        else:
            sp = [float(v) for v in sp]
            if len(sp) != 3:
                raise ValueError(f"spacing must be a number or (sx, sy, sz), got {sp}")
            sxy, sz = sp[0], sp[2]
            if abs(sp[0] - sp[1]) > 1e-9:
                raise ValueError(f"in-plane spacing must be isotropic, got {sp[:2]}")
    if sxy <= 0 or sz <= 0:
        raise ValueError(f"spacing must be positive, got {sxy}, {sz}")
    z_hi, z_lo_needed = anatomy_span
    top = z_hi + acq["top_margin"]
    if "n_slices" in overrides:
        nz = int(overrides["n_slices"])
        if nz < 1:
            raise ValueError(f"n_slices must be >= 1, got {nz}")
    elif "z_extent" in overrides:
        nz = max(1, int(round(float(overrides["z_extent"]) / sz)))
    elif acq.get("fov_top") is not None:  # drawn by tools.phantom.variety: the top, and the bottom unless None
        top = float(acq["fov_top"])
        bottom = acq.get("fov_bottom")
        if bottom is None:
            bottom = min(top - acq["z_extent"], z_lo_needed)
        nz = min(int(math.ceil((top - float(bottom)) / sz)) + 1, int(cfg["max_slices"]))  # keep the top
    else:
        nz = int(math.ceil(max(acq["z_extent"], top - z_lo_needed) / sz)) + 1
        if nz > int(cfg["max_slices"]):
            nz = int(cfg["max_slices"])  # memory guard: keep the organs, give up top margin first
            top = min(top, max(z_lo_needed + (nz - 1) * sz, z_hi + 5.0))
    # in-plane: centre on the body in x; in y so that the body and (if it fits) the table are inside
    fov = nx * sxy
    y_back = -g["b"] - g["table_gap"] - g["table_thick"] * 0.6
    y_front = g["b"] + 5.0
    cy = 0.5 * (y_back + y_front) if (y_front - y_back) < ny * sxy else 0.0
    cx = acq["fov_dx"] * (fov > 2 * a_half + 40)
    xs = cx + (np.arange(nx) - (nx - 1) / 2.0) * sxy
    ys = cy + (np.arange(ny) - (ny - 1) / 2.0) * sxy
    zs = top - (nz - 1) * sz + np.arange(nz) * sz
    return xs, ys, zs, (sxy, sxy, sz)


def hu_image(cv: Canvas, hu: dict, phase: str, y_vb: float, acq: dict, spacing, seed: int) -> np.ndarray:
    """Tissue map -> HU: per-tissue values and textures, partial-volume blur, correlated noise.

    ``hu``: the case's value per tissue for ``phase``; ``y_vb``: the vertebral body's y (dependent lung is denser).
    """
    n = len(TISSUE_NAMES)
    base = np.array([hu[name] for name in TISSUE_NAMES], np.float32)
    af = np.zeros(n, np.float32)
    ac = np.zeros(n, np.float32)
    for name, (f_, c_) in TEXTURE.items():
        af[T[name]], ac[T[name]] = f_, c_
    if phase == "arterial":  # heterogeneous ("zebra") spleen and mixing in the IVC
        ac[T["spleen"]] = 22.0
        ac[T["caval_blood"]] = 20.0
    for name, gain in (acq.get("texture_gain") or {}).items():  # ``varied`` preset: per-case texture strength
        af[T[name]] *= gain
        ac[T[name]] *= gain
    lo = np.array([cv.xs[0], cv.ys[0], cv.zs[0]]) - 5
    hi = np.array([cv.xs[-1], cv.ys[-1], cv.zs[-1]]) + 5
    fine = Field(child_rng(seed, "texture_fine"), lo, hi, 2.5)
    coarse = Field(child_rng(seed, "texture_coarse"), lo, hi, 12.0)
    img = np.empty(cv.shape, np.float32)
    chunk = max(1, int(2e6 // (cv.shape[0] * cv.shape[1])))
    y_dep = smoothstep(y_vb + 60.0, y_vb - 40.0, cv.ys)[None, :, None].astype(np.float32)
    for k0 in range(0, cv.shape[2], chunk):
        k1 = min(k0 + chunk, cv.shape[2])
        t = cv.tissue[:, :, k0:k1]
        zs = cv.zs[k0:k1]
        tf = fine(cv.xs, cv.ys, zs)
        tc = coarse(cv.xs, cv.ys, zs)
        v = base[t] + af[t] * tf + ac[t] * tc
        lung = t == T["lung"]
        if lung.any():  # denser dependent lung, vessels as bright dots
            v = np.where(lung, v + 70.0 * y_dep + np.where(tf > 2.0, 650.0, 0.0), v)
        st = t == T["stool"]
        if st.any():  # gas bubbles in stool
            v = np.where(st & (tf > 1.1), -850.0 + 40.0 * tc, v)
        img[:, :, k0:k1] = v
    # partial volume: the voxel footprint (a box, sigma 0.29 voxel) and the in-plane point spread of the scanner
    sig = [math.sqrt(0.29**2 + (acq["psf_mm"] / s) ** 2) for s in spacing[:2]] + [0.35]
    img = ndimage.gaussian_filter(img, sig, mode="nearest", truncate=3.0)
    # correlated noise: white noise blurred in-plane, rescaled to the drawn standard deviation
    rng = child_rng(seed, "noise")
    sn = acq["noise_corr_mm"] / spacing[0]
    delta = np.zeros(33, np.float32)
    delta[16] = 1.0
    k = ndimage.gaussian_filter1d(delta, sn, truncate=3.0) if sn > 0.05 else delta
    gain = float(np.sum(k**2))  # variance factor per axis
    scale = acq["noise_std"] / math.sqrt(gain * gain)
    chunk = max(1, int(4e6 // (cv.shape[0] * cv.shape[1])))
    for k0 in range(0, cv.shape[2], chunk):
        k1 = min(k0 + chunk, cv.shape[2])
        nz = rng.standard_normal((cv.shape[0], cv.shape[1], k1 - k0), dtype=np.float32)
        if sn > 0.05:
            nz = ndimage.gaussian_filter(nz, [sn, sn, 0.0], mode="wrap", truncate=3.0)
        img[:, :, k0:k1] += np.float32(scale) * nz
    if acq.get("recon_circle"):
        r2 = (0.5 * min(cv.shape[0], cv.shape[1]) * spacing[0]) ** 2
        cxy = (cv.xs.mean(), cv.ys.mean())
        outside = ((cv.xs[:, None] - cxy[0]) ** 2 + (cv.ys[None, :] - cxy[1]) ** 2) > r2
        np.clip(img, -1024, 3071, out=img)
        img[outside] = -2048.0
        return np.rint(img).astype(np.int16)
    np.clip(img, -1024, 3071, out=img)
    return np.rint(img).astype(np.int16)


def orient(image: np.ndarray, label: np.ndarray, xs, ys, zs, spacing, world_offset, flips):
    """Canonical RAS arrays -> the drawn voxel order: flipped arrays (C-contiguous) and the affine that maps them."""
    off = np.asarray(world_offset, float)
    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [xs[0] + off[0], ys[0] + off[1], zs[0] + off[2]]
    for axis, flip in enumerate(flips):
        if flip:
            image = np.flip(image, axis)
            label = np.flip(label, axis)
            affine[:3, 3] += affine[:3, axis] * (image.shape[axis] - 1)
            affine[:3, axis] *= -1.0
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine
