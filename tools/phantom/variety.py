"""Variety for phantoms that must carry over to real CT (the ``varied`` preset; issue 16, ``bundle/docs/real_ct.md``).

The diagnosis of the demo weights on real CT found four gaps between the ``demo`` phantoms and patients, and this
module draws, per case, what closes each of them. Every number comes from its own generator
(``child_rng(seed, "variety")``), so the draws of :func:`tools.phantom.params.sample_params` do not move and the
other presets stay byte-identical.

1. **Field of view.** ``demo`` phantoms always start 15-60 mm above the right dome and end below the kidneys. Here
   the top is drawn above the dome (as before), inside the liver, or far into the chest, and the bottom below the
   kidneys (as before), in the pelvis (with the urinary bladder, rectum and femoral heads painted), or a short
   upper-abdomen slab of 40-120 mm.
2. **Contrast.** A fixed HU order (the spleen always brighter than the liver in the portal-venous phase) is a shortcut
   real scans break. Here the enhancement is a continuum (a per-case factor between the native value and the phase's),
   every soft-tissue organ gets its own offset, spleen and pancreas are drawn relative to the liver with ranges that
   overlap on both sides, fatty liver and fatty pancreas occur, and a scanner offset shifts all soft tissue (SynthSeg,
   Billot et al. 2023, in a bounded form: the organs keep plausible CT values).
3. **Texture and noise.** Real within-organ spread is 1.3-2x the phantoms': texture amplitudes are scaled by 1-2.5
   per case and the noise reaches 28 HU.
4. **Shape and position.** Spleens up to 380 ml, a more posterior spleen, a more lateral liver.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tools.phantom.geometry import child_rng

#: Soft tissues whose HU is offset per organ (and by the scanner offset). Vessels and blood follow one offset each.
SOFT_TISSUES = (
    "muscle",
    "liver",
    "hepatic_vein",
    "spleen",
    "pancreas",
    "kidney_cortex",
    "kidney_medulla",
    "gallbladder_wall",
    "gi_wall",
    "myocardium",
    "heart_blood",
    "arterial_blood",
    "portal_blood",
    "caval_blood",
    "skin",
)

#: Tissues whose texture amplitude is scaled per case.
TEXTURED = ("liver", "spleen", "pancreas", "kidney_cortex", "kidney_medulla", "gi_wall", "muscle", "visceral_fat")

#: Field-of-view modes and their probabilities: where the top and the bottom of the scan lie.
TOP_MODES = {"above_dome": 0.4, "inside_liver": 0.45, "chest": 0.15}
BOTTOM_MODES = {"below_kidneys": 0.35, "pelvis": 0.5, "slab": 0.15}


def _pick(rng: np.random.Generator, table: dict[str, float]) -> str:
    return str(rng.choice(list(table), p=list(table.values())))


def sample_variety(seed: int, g: dict, acq: dict) -> dict[str, Any]:
    """Draw this case's variety and apply it to the drawn anatomy ``g`` and acquisition ``acq`` (in place).

    Returns what was drawn (recorded in the case's parameters).
    """
    rng = child_rng(seed, "variety")
    phase = acq["phase"]
    out: dict[str, Any] = {}

    # 1. field of view: absolute top and bottom (mm, canonical z); the grid keeps them within the preset's slices
    top_mode, bottom_mode = _pick(rng, TOP_MODES), _pick(rng, BOTTOM_MODES)
    z_R, z_crest = g["z_R"], g["z_crest"]
    u_top = [float(rng.uniform(15, 60)), float(rng.uniform(3, 70)), float(rng.uniform(60, 130))]
    top = {"above_dome": z_R + u_top[0], "inside_liver": z_R - u_top[1], "chest": z_R + u_top[2]}[top_mode]
    u_bottom = [float(rng.uniform(0, 40)), float(rng.uniform(130, 200)), float(rng.uniform(40, 120))]
    if bottom_mode == "slab":  # a short upper-abdomen slab always starts inside the liver
        top_mode = "inside_liver"
        top = z_R - float(rng.uniform(10, 80))
        bottom = top - u_bottom[2]
    elif bottom_mode == "pelvis":
        bottom = z_crest - u_bottom[1]
    else:
        bottom = None  # below the kidneys, as the other presets
    acq["fov_top"] = round(float(top), 2)
    acq["fov_bottom"] = None if bottom is None else round(float(bottom), 2)
    g["pelvic_organs"] = bottom_mode == "pelvis"
    g["bladder_ml"] = float(rng.uniform(60, 480))
    g["bladder_d"] = [float(v) for v in rng.normal(0, [6, 5, 8])]
    out["fov"] = {"top": top_mode, "bottom": bottom_mode}

    # 2. contrast: enhancement continuum, organ offsets, relative spleen/pancreas, fatty organs, scanner offset
    hu = g["hu_all"]
    enh = float(rng.uniform(0.55, 1.25)) if phase != "native" else 0.0
    scanner = float(rng.uniform(-15, 10))
    offsets = {name: float(np.clip(rng.normal(0, 12), -30, 30)) for name in SOFT_TISSUES}
    fatty_liver = bool(rng.uniform() < 0.15)
    fatty_liver_hu = float(rng.uniform(15, 55))
    fatty_pancreas = bool(rng.uniform() < 0.35)
    fatty_pancreas_hu = float(rng.uniform(15, 55))
    spleen_rel = float(rng.uniform(-25, 25)) if phase != "native" else float(rng.uniform(-22, 5))
    pancreas_rel = float(rng.uniform(-35, 15))
    kidney_native = float(rng.uniform(12, 40))
    new = {}
    for name in SOFT_TISSUES:
        native = hu[name]["native"]
        v = native + enh * (hu[name][phase] - native) if phase != "native" else native
        new[name] = v + offsets[name] + scanner
    if phase == "native":
        new["kidney_cortex"] = kidney_native + scanner
        new["kidney_medulla"] = kidney_native - 3.0 + scanner
    if fatty_liver:
        new["liver"] -= fatty_liver_hu
    new["spleen"] = new["liver"] + spleen_rel + (fatty_liver_hu if fatty_liver else 0.0) * float(rng.uniform(0, 1))
    new["pancreas"] = new["liver"] + pancreas_rel - (fatty_pancreas_hu if fatty_pancreas else 0.0)
    if fatty_liver:
        new["pancreas"] += fatty_liver_hu
    for name, v in new.items():
        hu[name][phase] = round(float(v), 1)
    out["contrast"] = {
        "enhancement": round(enh, 3),
        "scanner_offset": round(scanner, 1),
        "fatty_liver": fatty_liver,
        "fatty_pancreas": fatty_pancreas,
        "spleen_minus_liver": round(new["spleen"] - new["liver"], 1),
    }

    # 3. texture and noise
    acq["texture_gain"] = {name: round(float(rng.uniform(1.0, 2.5)), 3) for name in TEXTURED}
    acq["noise_std"] = float(rng.uniform(6.0, 28.0))

    # 4. shape and position
    t = g["targets_ml"]
    t["spleen"] = float(np.clip(t["spleen"] * rng.uniform(0.8, 1.6), 100.0, 380.0))
    t["stomach"] = float(np.clip(t["stomach"] * rng.uniform(0.5, 1.1), 90.0, 340.0))
    g["d_spleen"][1] -= float(rng.uniform(0, 22))  # more posterior
    g["d_liver"][0] += float(rng.uniform(0, 16))  # more lateral (towards the patient's right)
    g["d_gallbladder"][0] += float(rng.uniform(0, 14))
    out["targets_ml"] = {k: round(t[k], 1) for k in ("spleen", "stomach")}
    return out
