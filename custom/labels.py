"""Label sets.

The paper's seven structures are the default (K = 8 with background). The phantoms draw more structures than any label
set names (kidneys, inferior vena cava, ...), so that fine-tuning to a larger label set has something to learn.

``portal_vein`` is the portal vein together with the splenic vein, as in TotalSegmentator's
``portal_vein_and_splenic_vein`` class (the paper calls this structure "vein").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: Every structure the phantom generator can label, by canonical name.
STRUCTURES: tuple[str, ...] = (
    "artery",
    "portal_vein",
    "liver",
    "spleen",
    "stomach",
    "gallbladder",
    "pancreas",
    "kidney_right",
    "kidney_left",
    "inferior_vena_cava",
)

#: The paper's label set: 1 artery, 2 portal vein, 3 liver, 4 spleen, 5 stomach, 6 gallbladder, 7 pancreas.
PAPER_LABELS: dict[str, int] = {name: i + 1 for i, name in enumerate(STRUCTURES[:7])}

#: The paper's seven plus both kidneys and the IVC (the fine-tuning example of the paper's section 4).
EXTENDED_LABELS: dict[str, int] = {name: i + 1 for i, name in enumerate(STRUCTURES)}

LABEL_SETS: dict[str, dict[str, int]] = {"paper": PAPER_LABELS, "extended": EXTENDED_LABELS}

#: The label scheme of the real CTs in ``shared/data/real`` (TotalSegmentator-derived), mapped to canonical names.
REAL_CT_LABELS: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
    "artery": 11,
    "inferior_vena_cava": 12,
    "portal_vein": 13,
}


def resolve_labels(labels: str | Mapping[str, int] | Sequence[str]) -> dict[str, int]:
    """Return a ``{name: id}`` map from a label-set name, an explicit map, or a list of names (ids 1, 2, ...).

    >>> resolve_labels(["liver", "spleen"])
    {'liver': 1, 'spleen': 2}
    """
    if isinstance(labels, str):
        if labels not in LABEL_SETS:
            raise ValueError(f"unknown label set {labels!r}; known: {sorted(LABEL_SETS)}")
        out = dict(LABEL_SETS[labels])
    elif isinstance(labels, Mapping):
        out = {str(k): int(v) for k, v in labels.items()}
    else:
        out = {str(name): i + 1 for i, name in enumerate(labels)}
    unknown = sorted(set(out) - set(STRUCTURES) - {"background"})
    if unknown:
        raise ValueError(f"unknown structure(s) {unknown}; the phantoms know {list(STRUCTURES)}")
    out.pop("background", None)
    ids = sorted(out.values())
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(f"label ids must be 1..{len(ids)} without gaps, got {ids}")
    return out


def label_names(labels: Mapping[str, int]) -> list[str]:
    """Names ordered by id, background first (index = class id)."""
    return ["background"] + [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])]
