"""Glue between the bundle configs and MONAI's engines: data lists per split and batch preparation for evaluators.

The training batch preparation (patch augmentation on the training device) lives in :mod:`custom.augment`; this
module holds the evaluation side, where whole volumes go through the tiled inferer restricted to the candidate region.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import CommonKeys

from custom.data import load_datalist, train_val_split


def datalist(
    dataset_json: str,
    split: str = "train",
    val_fraction: float = 0.2,
    seed: int = 0,
    candidates_dir: str | None = None,
    candidate_key: str = "c2",
    max_cases: int | None = None,
) -> list[dict]:
    """Cases of one split of an MSD dataset.json, paired by case id.

    ``split``: ``"train"`` / ``"val"`` (a deterministic split of the ``training`` list), ``"all"`` (the whole
    ``training`` list) or ``"test"``. With ``candidates_dir`` (stage 2), each case gets ``candidate_key`` pointing to
    ``<candidates_dir>/<case_id>_c2.nii.gz`` written by the stage-1 prediction step; a missing file is an error.
    """
    if split == "test":
        cases = load_datalist(dataset_json, key="test")
    else:
        cases = load_datalist(dataset_json, key="training")
        if split in ("train", "val"):
            train, val = train_val_split(cases, val_fraction=val_fraction, seed=seed)
            cases = train if split == "train" else val
        elif split != "all":
            raise ValueError(f"unknown split {split!r}: use train, val, all or test")
    if candidates_dir is not None:
        missing = []
        for case in cases:
            path = Path(candidates_dir) / f"{case['case_id']}_{candidate_key}.nii.gz"
            if not path.is_file():
                missing.append(str(path))
            case[candidate_key] = str(path)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} candidate region file(s) missing (run the stage-1 prediction step first): "
                + ", ".join(missing[:5])
            )
    return cases[:max_cases] if max_cases else cases


class CandidatePrepareBatch(PrepareBatch):
    """Batch preparation for evaluators: image and label to the device, the candidate mask as the inferer's ``mask``.

    MONAI's evaluator calls ``inferer(inputs, network, *args, **kwargs)`` with what this returns, so the tiled inferer
    skips tiles outside the candidate region and writes background there.
    """

    def __init__(self, candidate_key: str | None = "c1", image_key: str = CommonKeys.IMAGE, label_key: str = "label"):
        self.candidate_key = candidate_key
        self.image_key = image_key
        self.label_key = label_key

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking)
        label = batchdata.get(self.label_key)
        if label is not None:
            label = label.to(device=device, non_blocking=non_blocking)
        extra: dict = {}
        if self.candidate_key is not None and self.candidate_key in batchdata:
            extra["mask"] = batchdata[self.candidate_key].to(device=device, non_blocking=non_blocking)
        return image, label, (), extra


def per_class_names(labels: dict[str, int]) -> Sequence[str]:
    """Organ names in class-id order (no background), for MeanDice's ``return_with_label``."""
    return [name for name, _ in sorted(labels.items(), key=lambda kv: kv[1])]


def inference_datalist(path: str, split: str = "test") -> list[dict]:
    """Cases to segment: a NIfTI file, a folder of NIfTI files, a DICOM series folder, or an MSD ``dataset.json``
    (then the ``split`` list, ``test`` by default, with its labels for evaluation). Each dict has ``image`` and
    ``case_id`` (and ``label`` from a dataset.json)."""
    from custom.io import list_inputs

    if str(path).endswith(".json"):
        if split == "test":
            return load_datalist(path, key="test")
        return datalist(path, split=split)
    return [{"image": str(c.path), "case_id": c.case_id} for c in list_inputs(path)]
