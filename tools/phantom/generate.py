"""One phantom from one seed: draw the numbers, build the anatomy, render it, acquire the image, orient the arrays."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from custom.labels import resolve_labels
from tools.phantom.acquisition import OVERRIDES, PHASES, PRESETS, hu_image, orient, orientation_flips, resolve_grid
from tools.phantom.anatomy import Anatomy
from tools.phantom.params import sample_params
from tools.phantom.render import Canvas, labels_from_owner, render, volumes_ml
from tools.phantom.variety import sample_variety

#: Version of the generator, recorded in every case's parameters and in ``dataset.json``; bumped when a seed's
#: phantom changes.
GENERATOR_VERSION = "1.0.0"


@dataclass
class Phantom:
    """One generated case.

    ``image`` (int16 HU) and ``label`` (uint8) are (X, Y, Z) arrays in the stored voxel order, ``affine`` maps voxel
    indices to RAS world millimetres, ``labels`` is the label map's ``{name: id}`` and ``params`` records everything
    drawn for the case (JSON-friendly).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    labels: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)

    def save(self, image_path: str | Path, label_path: str | Path) -> tuple[Path, Path]:
        """Write image (int16) and label (uint8) NIfTI files with the affine in both qform and sform, each through
        :func:`custom.outputs.atomic_write` (a killed run leaves no truncated case)."""
        import nibabel as nib

        from custom.outputs import atomic_write

        out = []
        for arr, path, dtype in ((self.image, image_path, np.int16), (self.label, label_path, np.uint8)):
            path = Path(path)
            img = nib.Nifti1Image(np.asarray(arr).astype(dtype, copy=False), self.affine)
            img.header.set_data_dtype(dtype)
            img.set_qform(self.affine, code=1)
            img.set_sform(self.affine, code=1)
            img.header.set_xyzt_units("mm", "sec")
            suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"  # nibabel picks the format by it
            with atomic_write(path, suffix=suffix) as tmp:
                nib.save(img, str(tmp))
            out.append(path)
        return out[0], out[1]


def anatomy_span(an: Anatomy) -> tuple[float, float]:
    """The z range (mm) the field of view must cover: from the right dome down below the kidneys."""
    g = an.g
    return g["z_R"], min(an.organs["kidney_right"].box()[0][2] + 25.0, g["z_P"] - 95.0)


def generate_phantom(seed: int, labels="paper", preset: str = "demo", **overrides) -> Phantom:
    """Generate one synthetic abdominal CT with its label map.

    Args:
        seed: the case seed; the same seed gives byte-identical image and label.
        labels: what ``custom.labels.resolve_labels`` accepts (default: the paper's seven, K = 8 with background).
            Structures outside the set are drawn all the same and get label 0.
        preset: ``"full"`` (512x512, 0.6-0.9 mm, 0.5-2.5 mm slices), ``"demo"`` (128x128 over the same field of view,
            2.4-3.6 mm, 2.5-5 mm slices), ``"varied"`` (the demo grid with the fields of view, contrast, texture and
            shape variety of ``tools.phantom.variety``) or ``"tiny"`` (64x64, ~6 mm, for unit tests).
        overrides: see ``OVERRIDES`` (matrix, spacing, slice_spacing, n_slices, z_extent, orientation, phase,
            noise_std, recon_circle). They replace drawn values without changing any other draw.

    >>> p = generate_phantom(3, labels="extended", preset="tiny", orientation="LPS", phase="portal_venous")
    >>> p.params["orientation"], p.labels["kidney_left"], p.image.dtype.name
    ('LPS', 9, 'int16')
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"unknown override(s) {unknown}; allowed: {OVERRIDES}")
    label_map = resolve_labels(labels)
    cfg = PRESETS[preset]
    seed = int(seed)
    rng = np.random.default_rng(seed)
    drawn = sample_params(rng, cfg)
    g, acq = drawn["anatomy"], drawn["acquisition"]
    for key in ("orientation", "phase", "noise_std", "recon_circle"):
        if key in overrides:
            acq[key] = overrides[key]
    if acq["phase"] not in PHASES:
        raise ValueError(f"phase must be one of {list(PHASES)}, got {acq['phase']!r}")
    variety = sample_variety(seed, g, acq) if cfg.get("variety") else None
    if variety is not None and "noise_std" in overrides:
        acq["noise_std"] = overrides["noise_std"]
    flips = orientation_flips(acq["orientation"])
    acq["orientation"] = acq["orientation"].upper()
    an = Anatomy(seed, g)
    xs, ys, zs, spacing = resolve_grid(acq, g["a"], cfg, overrides, g, anatomy_span(an))
    cv = Canvas(xs, ys, zs)
    render(an, cv)
    hu = {name: v[acq["phase"]] for name, v in g["hu_all"].items()}
    image = hu_image(cv, hu, acq["phase"], an.y_vb, acq, spacing, seed)
    label = labels_from_owner(cv.owner, label_map)
    volumes = volumes_ml(cv.owner, spacing)
    del cv
    image, label, affine = orient(image, label, xs, ys, zs, spacing, acq["world_offset"], flips)
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "preset": preset,
        "overrides": {k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items()},
        "shape": list(image.shape),
        "spacing": [round(float(s), 4) for s in spacing],
        "orientation": acq["orientation"],
        "phase": acq["phase"],
        "noise_std": round(float(acq["noise_std"]), 2),
        "noise_corr_mm": round(acq["noise_corr_mm"], 3),
        "psf_mm": round(acq["psf_mm"], 3),
        "recon_circle": bool(acq["recon_circle"]),
        "fov_mm": [round(image.shape[0] * spacing[0], 1), round(image.shape[1] * spacing[1], 1)],
        "z_extent_mm": round(image.shape[2] * spacing[2], 1),
        "body": {
            "habitus": round(g["habitus"], 3),
            "lr_width_mm": round(2 * g["a"], 1),
            "ap_depth_mm": round(2 * g["b"], 1),
            "subcutaneous_fat_mm": round(g["fat"], 1),
        },
        "volumes_ml": volumes,
        "target_volumes_ml": {k: round(v, 1) for k, v in g["targets_ml"].items()},
        "hu": {k: v for k, v in hu.items()},
    }
    if variety is not None:
        params["variety"] = variety
    return Phantom(image=image, label=label, affine=affine, labels=dict(label_map), params=params)
