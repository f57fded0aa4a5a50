"""Label sets of public CT datasets, and their mapping to the label set a network is trained with.

A dataset's label files carry its own ids (BTCV: 6 = liver; AMOS: 6 = liver; TotalSegmentator: 5 = liver; ...). The
option ``source_labels`` (``bundle/configs/common.json``) names the ids a dataset uses, either as a preset below or as
an explicit ``{source_id: name}`` map, and the shared preprocessing maps them on loading with MONAI's
``MapLabelValued`` to the ids of ``labels`` (the paper's seven structures by default). Training, candidates,
evaluation and ``custom.data verify`` therefore all see the same mapped labels.

Mapping rules (:func:`label_mapping`), per source id with structure name ``s``:

1. ``s`` is in ``labels`` -> its id there;
2. else a synonym of ``s`` is (:data:`SYNONYMS`: the project's ``artery`` is the datasets' ``aorta``, its
   ``portal_vein`` their ``portal_vein_and_splenic_vein``) -> that id;
3. else the structure ``s`` is part of is (:data:`PART_OF`: a liver tumour is liver, a pancreas tumour is pancreas,
   a kidney cyst is kidney) -> that id;
4. else 0: a labelled structure the network is not trained for (kidney, duodenum, ... for the paper's seven) is
   background.

A structure of ``labels`` that no source id maps to is **absent** for that dataset (AMOS has no portal vein, MSD
Task09 has only the spleen): its voxels are unlabelled, hidden in the dataset's background. The losses then merge it
into the background instead of pushing it towards background (``absent_classes`` of ``custom.loss``), and its Dice is
NaN, not 0 (it never occurs in the mapped ground truth). See ``bundle/docs/datasets.md``.

>>> m = label_mapping("amos", {"artery": 1, "portal_vein": 2, "liver": 3})
>>> m.mapping[6], m.mapping[8], m.mapping[2], m.absent
(3, 1, 0, ['portal_vein'])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "PRESETS",
    "SYNONYMS",
    "PART_OF",
    "LabelPreset",
    "LabelMapping",
    "get_preset",
    "source_label_names",
    "label_mapping",
    "dataset_labels",
]


@dataclass(frozen=True)
class LabelPreset:
    """A dataset's label ids (``{id: structure name}``, background 0 left out) and where they were read."""

    name: str
    labels: dict[int, str]
    source: str
    notes: str = ""


#: Structure names that denote the same structure in the project's and the datasets' vocabulary (both directions).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "artery": ("aorta",),
    "aorta": ("artery",),
    "portal_vein": ("portal_vein_and_splenic_vein",),
    "portal_vein_and_splenic_vein": ("portal_vein",),
}

#: A labelled part that belongs to a larger structure when the target label set has no class of its own for it.
PART_OF: dict[str, str] = {
    "liver_tumour": "liver",
    "pancreas_tumour": "pancreas",
    "kidney_cyst_left": "kidney_left",
    "kidney_cyst_right": "kidney_right",
}

_BTCV = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",
    10: "portal_vein_and_splenic_vein",
    11: "pancreas",
    12: "adrenal_gland_right",
    13: "adrenal_gland_left",
}

_AMOS = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",  # "postcava"
    10: "pancreas",
    11: "adrenal_gland_right",
    12: "adrenal_gland_left",
    13: "duodenum",
    14: "urinary_bladder",
    15: "prostate_or_uterus",
}

#: TotalSegmentator v2, task ``total`` (117 classes), copied from ``class_map["total"]``.
_TOTALSEG_V2 = dict(
    enumerate(
        [
            "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
            "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
            "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea",
            "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate", "kidney_cyst_left",
            "kidney_cyst_right", "sacrum", "vertebrae_S1", "vertebrae_L5", "vertebrae_L4", "vertebrae_L3",
            "vertebrae_L2", "vertebrae_L1", "vertebrae_T12", "vertebrae_T11", "vertebrae_T10", "vertebrae_T9",
            "vertebrae_T8", "vertebrae_T7", "vertebrae_T6", "vertebrae_T5", "vertebrae_T4", "vertebrae_T3",
            "vertebrae_T2", "vertebrae_T1", "vertebrae_C7", "vertebrae_C6", "vertebrae_C5", "vertebrae_C4",
            "vertebrae_C3", "vertebrae_C2", "vertebrae_C1", "heart", "aorta", "pulmonary_vein",
            "brachiocephalic_trunk", "subclavian_artery_right", "subclavian_artery_left",
            "common_carotid_artery_right", "common_carotid_artery_left", "brachiocephalic_vein_left",
            "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava",
            "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left",
            "iliac_vena_right", "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
            "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord",
            "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
            "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right",
            "iliopsoas_left", "iliopsoas_right", "brain", "skull",
            *[f"rib_left_{i}" for i in range(1, 13)],
            *[f"rib_right_{i}" for i in range(1, 13)],
            "sternum", "costal_cartilages",
        ],
        start=1,
    )
)  # fmt: skip

_WORD = {
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "stomach",
    6: "gallbladder",
    7: "esophagus",
    8: "pancreas",
    9: "duodenum",
    10: "colon",
    11: "intestine",
    12: "adrenal_gland",
    13: "rectum",
    14: "urinary_bladder",
    15: "femur_head_left",
    16: "femur_head_right",
}

_FLARE22 = {
    1: "liver",
    2: "kidney_right",
    3: "spleen",
    4: "pancreas",
    5: "aorta",
    6: "inferior_vena_cava",
    7: "adrenal_gland_right",
    8: "adrenal_gland_left",
    9: "gallbladder",
    10: "esophagus",
    11: "stomach",
    12: "duodenum",
    13: "kidney_left",
}

_MSD = (
    "Medical Segmentation Decathlon, http://medicaldecathlon.com (Antonelli et al., Nat Commun 13:4128, 2022; "
    "Simpson et al., arXiv:1902.09063): the task's dataset.json 'labels'"
)

#: The label scheme of the project's real example CTs (``shared/data/real/LABELS.md``, TotalSegmentator-derived).
_REAL_CT = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "pancreas",
    8: "adrenal_gland_right",
    9: "adrenal_gland_left",
    10: "esophagus",
    11: "aorta",
    12: "inferior_vena_cava",
    13: "portal_vein_and_splenic_vein",
    14: "duodenum",
    15: "small_bowel",
    16: "colon",
    17: "urinary_bladder",
    18: "trunk_vessels_unspecified",
}

PRESETS: dict[str, LabelPreset] = {
    p.name: p
    for p in (
        LabelPreset(
            "btcv",
            _BTCV,
            "BTCV / Synapse 'Multi-Atlas Labeling Beyond the Cranial Vault', abdomen: "
            "https://www.synapse.org/#!Synapse:syn3193805/wiki/217752 (label list 1-13 as given there and in "
            "Project-MONAI/research-contributions UNETR/BTCV/README.md)",
            "13 organs; every one of the seven structures is labelled.",
        ),
        LabelPreset(
            "amos",
            _AMOS,
            "AMOS 2022 (Ji et al., NeurIPS 2022), dataset.json 'labels' in JiYuanFeng/AMOS splits/dataset_ct.json "
            "(1 spleen ... 8 'arota', 9 'postcava' ... 15 'prostate/uterus'); https://amos22.grand-challenge.org",
            "15 organs; no portal/splenic vein label.",
        ),
        LabelPreset(
            "totalsegmentator",
            _TOTALSEG_V2,
            "TotalSegmentator v2, task 'total': wasserth/TotalSegmentator totalsegmentator/map_to_binary.py, "
            "class_map['total'] (117 classes)",
            "aorta only for 'artery' (iliac and other arteries are background); kidney cysts count as kidney.",
        ),
        LabelPreset(
            "word",
            _WORD,
            "WORD (Luo et al., Medical Image Analysis 82:102642, 2022; arXiv:2111.02403; "
            "https://github.com/HiLab-git/WORD): the 16 organs in the order of the paper's organ table, as in the "
            "released dataset.json (also listed in uni-medical/A-Eval Evaluation/label_systems.py)",
            "16 organs; no aorta and no portal/splenic vein label; one label for both adrenal glands.",
        ),
        LabelPreset(
            "flare22",
            _FLARE22,
            "MICCAI FLARE 2022, https://flare22.grand-challenge.org: label order of the official evaluation "
            "JunMa11/FLARE FLARE22/Evaluation/FLARE22_DSC_NSD_Eval.py (Liver, RK, Spleen, Pancreas, Aorta, IVC, "
            "RAG, LAG, Gallbladder, Esophagus, Stomach, Duodenum, LK = 1..13)",
            "13 organs; no portal/splenic vein label.",
        ),
        LabelPreset(
            "msd_task03_liver",
            {1: "liver", 2: "liver_tumour"},
            _MSD + " of Task03_Liver: 0 background, 1 liver, 2 cancer",
            "liver and its tumours (the tumour counts as liver); every other structure is absent.",
        ),
        LabelPreset(
            "msd_task07_pancreas",
            {1: "pancreas", 2: "pancreas_tumour"},
            _MSD + " of Task07_Pancreas: 0 background, 1 pancreas, 2 cancer",
            "pancreas and its tumours (the tumour counts as pancreas); every other structure is absent.",
        ),
        LabelPreset(
            "msd_task09_spleen",
            {1: "spleen"},
            _MSD + " of Task09_Spleen: 0 background, 1 spleen",
            "spleen only; every other structure is absent.",
        ),
        LabelPreset(
            "real_ct",
            _REAL_CT,
            "this project's example CTs: shared/data/real/LABELS.md (TotalSegmentator v2 outputs remapped)",
            "pseudo ground truth from TotalSegmentator, for testing only.",
        ),
    )
}

#: Other spellings accepted for the preset names.
ALIASES: dict[str, str] = {
    "synapse": "btcv",
    "amos22": "amos",
    "totalseg": "totalsegmentator",
    "totalsegmentator_v2": "totalsegmentator",
    "total": "totalsegmentator",
    "flare": "flare22",
    "task03": "msd_task03_liver",
    "task03_liver": "msd_task03_liver",
    "msd_liver": "msd_task03_liver",
    "task07": "msd_task07_pancreas",
    "task07_pancreas": "msd_task07_pancreas",
    "msd_pancreas": "msd_task07_pancreas",
    "task09": "msd_task09_spleen",
    "task09_spleen": "msd_task09_spleen",
    "msd_spleen": "msd_task09_spleen",
    "real": "real_ct",
}


def get_preset(name: str) -> LabelPreset:
    """The preset called ``name`` (case-insensitive; aliases such as ``task09`` or ``totalseg`` accepted)."""
    key = str(name).strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(
            f"unknown source_labels preset {name!r}; known: {sorted(PRESETS)} (aliases: {sorted(ALIASES)}), "
            "or give an explicit {source_id: structure_name} mapping"
        )
    return PRESETS[key]


def _is_none(source_labels) -> bool:
    return source_labels is None or (
        isinstance(source_labels, str) and source_labels.strip().lower() in ("", "none", "null")
    )


def source_label_names(source_labels) -> tuple[str, dict[int, str]]:
    """``(description, {source_id: name})`` of a preset name or an explicit ``{source_id: name}`` mapping.

    Explicit ids may be ints or strings holding ints (JSON keys); id 0 is background and may be omitted.

    >>> source_label_names({"1": "liver", "2": "spleen"})
    ('explicit mapping', {1: 'liver', 2: 'spleen'})
    """
    if isinstance(source_labels, LabelPreset):
        return source_labels.name, dict(source_labels.labels)
    if isinstance(source_labels, str):
        p = get_preset(source_labels)
        return p.name, dict(p.labels)
    if not isinstance(source_labels, Mapping) or not source_labels:
        raise ValueError(
            f"source_labels must be a preset name ({sorted(PRESETS)}) or a non-empty {{source_id: structure_name}} "
            f"mapping, got {source_labels!r}"
        )
    out: dict[int, str] = {}
    for k, v in source_labels.items():
        try:
            sid = int(str(k).strip())
        except ValueError:
            raise ValueError(
                f"source_labels: key {k!r} is not an integer label id (expected {{source_id: name}})"
            ) from None
        if sid < 0:
            raise ValueError(f"source_labels: label id {sid} is negative")
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"source_labels: id {sid} maps to {v!r}; expected a structure name such as 'liver'")
        if sid == 0:
            if v.strip() != "background":
                raise ValueError(f"source_labels: id 0 is background, got {v!r}")
            continue
        out[sid] = v.strip()
    return "explicit mapping", out


def _target_of(name: str, labels: Mapping[str, int]) -> int:
    if name in labels:
        return int(labels[name])
    for alt in SYNONYMS.get(name, ()):
        if alt in labels:
            return int(labels[alt])
    whole = PART_OF.get(name)
    return _target_of(whole, labels) if whole is not None else 0


@dataclass
class LabelMapping:
    """How a dataset's label ids map to the training label set.

    ``mapping``: ``{source_id: target_id}`` for every id the dataset is known to use (0 = background);
    ``orig_labels`` / ``target_labels``: the same as two lists, the arguments of ``MapLabelValued``;
    ``absent``: target structures no source id maps to (unlabelled in this dataset), ``absent_ids`` their ids;
    ``active``: False for the identity (no ``source_labels``), when the preprocessing step is skipped.
    """

    source: str
    labels: dict[str, int]
    mapping: dict[int, int] = field(default_factory=dict)
    source_names: dict[int, str] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)
    active: bool = True

    @property
    def orig_labels(self) -> list[int]:
        return sorted(self.mapping)

    @property
    def target_labels(self) -> list[int]:
        return [self.mapping[k] for k in self.orig_labels]

    @property
    def source_ids(self) -> list[int]:
        return [0, *sorted(k for k in self.mapping if k != 0)]

    @property
    def absent_ids(self) -> list[int]:
        return sorted(self.labels[n] for n in self.absent)

    def apply(self, label):
        """The mapped copy of an integer label array (numpy), for code that reads label files itself; values the
        mapping does not know are kept, as ``MapLabelValued`` keeps them.

        >>> label_mapping("msd_task09_spleen", {"liver": 1, "spleen": 2}).apply(np.array([0, 1, 7])).tolist()
        [0, 2, 7]
        """
        arr = np.asarray(label)
        if not self.active:
            return arr.copy()
        out = arr.astype(np.int64, copy=True)
        for o, t in self.mapping.items():
            out[arr == o] = t
        return out

    def describe(self) -> list[str]:
        """One line per target structure: which source ids and names feed it, or that it is absent."""
        lines = []
        for name, tid in sorted(self.labels.items(), key=lambda kv: kv[1]):
            srcs = [f"{sid} {self.source_names.get(sid, '?')}" for sid, t in sorted(self.mapping.items()) if t == tid]
            lines.append(f"{tid} {name} <- " + (", ".join(srcs) if srcs else "ABSENT (not labelled in this dataset)"))
        bg = [f"{sid} {self.source_names[sid]}" for sid, t in sorted(self.mapping.items()) if t == 0 and sid]
        if bg:
            lines.append("0 background <- " + ", ".join(bg))
        return lines


def label_mapping(source_labels, labels: Mapping[str, int]) -> LabelMapping:
    """Map a dataset's label ids (``source_labels``: preset name or ``{source_id: name}``) to ``labels``.

    ``source_labels=None`` (or ``"none"``) is the identity: the label files already use the ids of ``labels``.
    An explicit mapping may only name structures of ``labels`` (or their synonyms / wholes), ``"background"``, or
    structures of the known presets; anything else is an error, so a misspelt ``"livr"`` is not silently background.

    >>> label_mapping({"1": "liver", "2": "background"}, {"liver": 1, "spleen": 2}).absent
    ['spleen']
    """
    labels = {str(k): int(v) for k, v in labels.items() if str(k) != "background"}
    if _is_none(source_labels):
        return LabelMapping("none", labels, active=False)
    desc, names = source_label_names(source_labels)
    if desc == "explicit mapping":
        known = set(labels) | {n for p in PRESETS.values() for n in p.labels.values()} | {"background"}
        unknown = sorted({n for n in names.values() if n not in known and _target_of(n, labels) == 0})
        if unknown:
            raise ValueError(
                f"source_labels: unknown structure name(s) {unknown}; use the names of labels {sorted(labels)}, "
                "'background', or a structure name of a preset (see custom.label_presets.PRESETS)"
            )
    mapping = {0: 0, **{sid: _target_of(n, labels) for sid, n in names.items()}}
    covered = set(mapping.values())
    absent = [n for n, i in sorted(labels.items(), key=lambda kv: kv[1]) if i not in covered]
    return LabelMapping(desc, labels, mapping, {0: "background", **names}, absent)


def dataset_labels(source_labels) -> dict[str, int]:
    """The dataset's own label set as ``{name: id}`` with ids 1..n in the order of the source ids: pass it as
    ``labels`` to train on all of the dataset's structures (``--labels @dataset_labels``).

    >>> dataset_labels("msd_task07_pancreas")
    {'pancreas': 1, 'pancreas_tumour': 2}
    """
    if _is_none(source_labels):
        raise ValueError(
            "dataset_labels needs source_labels (a preset name or a {source_id: name} mapping), e.g. "
            "--source_labels btcv --labels @dataset_labels"
        )
    _, names = source_label_names(source_labels)
    out: dict[str, int] = {}
    for sid in sorted(names):
        n = names[sid]
        if n != "background" and n not in out:
            out[n] = len(out) + 1
    return out
