"""Tissue classes of the phantoms, their HU ranges and textures, and the owner map's structures.

The renderer paints two maps: ``tissue`` (an index into :data:`TISSUE_NAMES`, which the acquisition turns into HU)
and ``owner`` (which structure a voxel belongs to, the label map's source: :data:`OWNERS`, id = index + 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from custom.labels import STRUCTURES

TISSUE_NAMES = (
    "air",
    "table_shell",
    "table_foam",
    "skin",
    "fat",
    "visceral_fat",
    "muscle",
    "cortical_bone",
    "cancellous_bone",
    "disc",
    "csf",
    "cartilage",
    "lung",
    "myocardium",
    "heart_blood",
    "liver",
    "hepatic_vein",
    "spleen",
    "pancreas",
    "kidney_cortex",
    "kidney_medulla",
    "urine",
    "bile",
    "gallbladder_wall",
    "gi_wall",
    "gi_fluid",
    "gas",
    "stool",
    "arterial_blood",
    "portal_blood",
    "caval_blood",
)
T = {name: i for i, name in enumerate(TISSUE_NAMES)}

#: HU range per tissue, either one range for every phase or one per phase. Each case draws one value per tissue.
TISSUE_HU: dict[str, Any] = {
    "air": (-1000, -1000),
    "table_shell": (250, 450),
    "table_foam": (-960, -900),
    "skin": (10, 50),
    "fat": (-115, -90),
    "visceral_fat": (-110, -85),
    "muscle": {"native": (42, 52), "arterial": (48, 58), "portal_venous": (50, 60)},
    "cortical_bone": (700, 1000),
    "cancellous_bone": (180, 300),
    "disc": (70, 100),
    "csf": (5, 20),
    "cartilage": (100, 160),
    "lung": (-880, -800),
    "myocardium": {"native": (40, 50), "arterial": (100, 140), "portal_venous": (90, 120)},
    "heart_blood": {"native": (35, 45), "arterial": (220, 320), "portal_venous": (130, 170)},
    "liver": {"native": (50, 65), "arterial": (60, 80), "portal_venous": (90, 110)},
    "hepatic_vein": {"native": (35, 45), "arterial": (50, 70), "portal_venous": (130, 170)},
    "spleen": {"native": (40, 50), "arterial": (95, 130), "portal_venous": (100, 120)},
    "pancreas": {"native": (35, 45), "arterial": (100, 130), "portal_venous": (80, 100)},
    "kidney_cortex": {"native": (30, 40), "arterial": (180, 250), "portal_venous": (150, 200)},
    "kidney_medulla": {"native": (28, 38), "arterial": (70, 110), "portal_venous": (145, 195)},
    "urine": (0, 15),
    "bile": (0, 20),
    "gallbladder_wall": {"native": (30, 40), "arterial": (50, 70), "portal_venous": (60, 90)},
    "gi_wall": {"native": (35, 45), "arterial": (70, 100), "portal_venous": (80, 110)},
    "gi_fluid": (5, 25),
    "gas": (-1000, -980),
    "stool": (-60, 40),
    "arterial_blood": {"native": (35, 45), "arterial": (250, 350), "portal_venous": (130, 180)},
    "portal_blood": {"native": (35, 45), "arterial": (80, 120), "portal_venous": (140, 180)},
    "caval_blood": {"native": (35, 45), "arterial": (60, 100), "portal_venous": (110, 150)},
}

#: Texture amplitude (HU) per tissue: (fine ~2.5 mm, coarse ~12 mm) correlated fields; arterial spleen is mottled.
TEXTURE = {
    "table_shell": (15, 0),
    "table_foam": (15, 0),
    "skin": (5, 0),
    "fat": (6, 4),
    "visceral_fat": (8, 6),
    "muscle": (6, 3),
    "cortical_bone": (60, 40),
    "cancellous_bone": (45, 30),
    "disc": (5, 0),
    "csf": (3, 0),
    "cartilage": (15, 10),
    "lung": (25, 20),
    "myocardium": (5, 0),
    "heart_blood": (4, 0),
    "liver": (4, 4),
    "hepatic_vein": (3, 0),
    "spleen": (4, 4),
    "pancreas": (9, 4),
    "kidney_cortex": (6, 0),
    "kidney_medulla": (6, 0),
    "urine": (2, 0),
    "bile": (2, 0),
    "gallbladder_wall": (3, 0),
    "gi_wall": (6, 4),
    "gi_fluid": (6, 6),
    "gas": (5, 0),
    "stool": (60, 40),
    "arterial_blood": (4, 0),
    "portal_blood": (4, 0),
    "caval_blood": (6, 8),
}

#: Structures the owner map tracks: the labellable ones first (owner id = index + 1), then unlabelled ones.
OWNERS: tuple[str, ...] = (*STRUCTURES, "duodenum", "colon", "small_bowel", "esophagus", "heart")
OWN = {name: i + 1 for i, name in enumerate(OWNERS)}

BONE = (T["cortical_bone"], T["cancellous_bone"], T["disc"], T["csf"], T["cartilage"])
#: Tissues vessels must not overwrite.
VESSEL_PROTECTED = np.zeros(len(TISSUE_NAMES), bool)
VESSEL_PROTECTED[[*BONE, T["air"], T["skin"], T["table_shell"], T["table_foam"]]] = True
