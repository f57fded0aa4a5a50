"""Training datasets: reading an MSD ``dataset.json`` (or its folders) into MONAI datalists, splitting into folds.

Users train on BTCV, AMOS, TCIA Pancreas-CT or their own data laid out as in the Medical Segmentation Decathlon
(``dataset.json`` + ``imagesTr/`` + ``labelsTr/``). :func:`load_datalist` reads what MONAI's
``load_decathlon_datalist`` reads (same paths for the same file) and adds a case id per entry, errors that name the
file and the entry, Windows separators, and case ids safe as file names; images and labels found by scanning the
folders are paired by case id, never by sorted order, so one missing file cannot shift every pair. Checking the
images and labels themselves before training is :mod:`custom.verify`.

Command line (``verify`` runs :func:`custom.verify.verify`)::

    python -m custom.data verify --dataset_json /data/Task07/dataset.json --labels paper
    python -m custom.data verify --dataset_json /data/btcv/dataset.json --labels paper --source_labels btcv
    python -m custom.data folds --dataset_json /data/Task07/dataset.json --n_folds 5 --output folds.json
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from custom.errors import InputError
from custom.nifti_io import nifti_case_id
from custom.options import as_bool
from custom.outputs import safe_case_id

if TYPE_CHECKING:
    from custom.verify import VerifyReport

__all__ = [
    "DatasetError",
    "case_id_from_path",
    "load_datalist",
    "split_folds",
    "train_val_split",
]

logger = logging.getLogger(__name__)

#: MSD / nnU-Net folders scanned by ``load_datalist(..., from_folders=True)``: key -> (images, labels or None).
FOLDERS = {"training": ("imagesTr", "labelsTr"), "test": ("imagesTs", None)}
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_WINDOWS_ABS = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")


class DatasetError(ValueError):
    """One or more problems with a training dataset; ``problems`` lists each one, naming its file."""

    def __init__(self, problems: Sequence[str], report: VerifyReport | None = None):
        super().__init__(problems, report)  # all arguments: the error pickles and copies intact
        self.problems = list(problems)
        self.report = report

    def __str__(self) -> str:
        head = f"{len(self.problems)} dataset problem(s):" if len(self.problems) > 1 else "dataset problem:"
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)


# ----------------------------------------------------------------------------------------------------------------------
# Datalists
# ----------------------------------------------------------------------------------------------------------------------


def case_id_from_path(path: str | os.PathLike, strip_channel: bool = True) -> str:
    """Case id of an image or label path: the file name without ``.nii``/``.nii.gz`` and, for images, without an
    nnU-Net channel suffix ``_0000``.

    >>> case_id_from_path("imagesTr/pancreas_001_0000.nii.gz")
    'pancreas_001'
    >>> case_id_from_path("labelsTr/pancreas_001.nii.gz")
    'pancreas_001'
    """
    stem = nifti_case_id(path) or Path(path).name
    m = _CHANNEL.match(stem)
    return m["case"] if strip_channel and m and m["channel"] == "0000" else stem


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError([f"{path}: file not found"])
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError([f"{path}: not valid JSON ({e})"]) from e
    if not isinstance(data, dict):
        raise DatasetError([f"{path}: expected a JSON object (MSD dataset.json), got {type(data).__name__}"])
    return data


def _resolve(root: Path, value: Any, where: str) -> str:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise DatasetError([f"{where}: {len(value)} image files for one case; the network takes one CT channel"])
        value = value[0]
    if not isinstance(value, (str, os.PathLike)):
        raise DatasetError([f"{where}: expected a file path, got {value!r}"])
    text = os.fspath(value)
    if os.sep == "/" and "\\" in text:
        if _WINDOWS_ABS.match(text):
            raise DatasetError(
                [f"{where}: {text!r} is a Windows absolute path; write paths relative to dataset.json, with '/'"]
            )
        text = text.replace("\\", "/")  # Windows separators ("imagesTr\\case_1.nii.gz"): the same relative path
    p = Path(text).expanduser()
    return os.path.normpath(p if p.is_absolute() else root / p)


def load_datalist(
    dataset_json: str | os.PathLike,
    key: str = "training",
    base_dir: str | os.PathLike | None = None,
    from_folders: bool = False,
) -> list[dict]:
    """Read one list of an MSD ``dataset.json`` as MONAI dicts ``{"image", "label", "case_id"}`` with absolute paths.

    ``training`` entries are ``{"image": ..., "label": ...}``; ``test`` entries are paths or ``{"image": ...}``.
    Relative paths are resolved against the folder of ``dataset_json`` (or ``base_dir``). With ``from_folders=True``
    the lists are built by scanning ``imagesTr``/``labelsTr`` (``imagesTs`` for ``test``) instead, pairing by case id
    (nnU-Net ``_0000`` channel suffixes allowed on images); ``dataset_json`` may then be the dataset folder itself.
    Errors (:class:`DatasetError`, naming the file): no such list, an empty list, duplicate case ids, unmatched image
    or label ids (all listed), multi-channel images, case ids that would name files outside an output folder
    (:func:`custom.io.safe_case_id`), Windows absolute paths. Windows separators in relative paths
    (``imagesTr\\case_1.nii.gz``) are read as ``/``.

    >>> cases = load_datalist("/data/Task07_Pancreas/dataset.json")  # doctest: +SKIP
    >>> cases[0]  # doctest: +SKIP
    {'image': '/data/Task07_Pancreas/imagesTr/pancreas_290.nii.gz', 'label': '/data/.../labelsTr/pancreas_290.nii.gz',
     'case_id': 'pancreas_290'}
    """
    src = Path(dataset_json).expanduser()
    if from_folders:
        root = Path(base_dir) if base_dir is not None else (src if src.is_dir() else src.parent)
        items = _scan_folders(root, key)
    else:
        if src.is_dir():
            src = src / "dataset.json"
        data = _read_json(src)
        root = Path(base_dir).expanduser() if base_dir is not None else src.parent
        if key not in data:
            raise DatasetError([f"{src}: no {key!r} list; keys present: {sorted(data)}"])
        entries = data[key]
        if not isinstance(entries, list):
            raise DatasetError([f"{src}: {key!r} must be a list, got {type(entries).__name__}"])
        items = []
        for i, entry in enumerate(entries):
            where = f"{src}: {key}[{i}]"
            if isinstance(entry, (str, os.PathLike)):
                entry = {"image": entry}
            if not isinstance(entry, Mapping) or "image" not in entry:
                raise DatasetError([f"{where}: expected a path or a dict with 'image', got {entry!r}"])
            item = dict(entry)
            item["image"] = _resolve(root, entry["image"], where)
            if "label" in entry:
                item["label"] = _resolve(root, entry["label"], where)
            elif key == "training":
                raise DatasetError([f"{where}: training entry without 'label'"])
            item.setdefault("case_id", case_id_from_path(item["image"]))
            try:
                safe_case_id(item["case_id"], where)
            except InputError as e:
                raise DatasetError([str(e)]) from e
            items.append(item)
    if not items:
        raise DatasetError([f"{src}: the {key!r} list is empty"])
    ids: dict[str, int] = {}
    for item in items:
        ids[item["case_id"]] = ids.get(item["case_id"], 0) + 1
    dups = sorted(k for k, n in ids.items() if n > 1)
    if dups:
        raise DatasetError([f"{src}: duplicate case ids in {key!r}: {dups[:20]}"])
    return items


def _nifti_files(folder: Path) -> list[Path]:
    # skip hidden files: MSD archives ship macOS "._pancreas_001.nii.gz" resource forks that are not images
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and nifti_case_id(p))


def _group_channels(files: Sequence[Path], strip: bool) -> dict[str, dict[int, Path]]:
    groups: dict[str, dict[int, Path]] = {}
    for f in files:
        stem = nifti_case_id(f)
        m = _CHANNEL.match(stem) if strip else None
        case, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        groups.setdefault(case, {})[channel] = f
    return groups


def _scan_folders(root: Path, key: str) -> list[dict]:
    if key not in FOLDERS:
        raise DatasetError([f"{root}: from_folders supports keys {sorted(FOLDERS)}, not {key!r}"])
    img_name, lab_name = FOLDERS[key]
    img_dir = root / img_name
    if not img_dir.is_dir():
        raise DatasetError([f"{img_dir}: folder not found"])
    images = _nifti_files(img_dir)
    # "amos_0001.nii.gz" is a case id, "case_001_0000.nii.gz" a channel suffix: strip only when every case then has
    # channels 0000, 0001, ... (or, with labels, when that pairs more images with labels)
    plain, stripped = _group_channels(images, False), _group_channels(images, True)
    strip_ok = all(_CHANNEL.match(nifti_case_id(f)) for f in images) and all(
        sorted(ch) == list(range(len(ch))) for ch in stripped.values()
    )
    labels: dict[str, Path] = {}
    if lab_name is not None:
        lab_dir = root / lab_name
        if not lab_dir.is_dir():
            raise DatasetError([f"{lab_dir}: folder not found"])
        labels = {nifti_case_id(f): f for f in _nifti_files(lab_dir)}
        if len(set(stripped) & set(labels)) != len(set(plain) & set(labels)):
            strip_ok = len(set(stripped) & set(labels)) > len(set(plain) & set(labels))
    groups = stripped if strip_ok else plain
    problems = [
        f"{img_dir}: case {case!r} has {len(ch)} channel files {[p.name for p in ch.values()]}; "
        "the network takes one CT channel"
        for case, ch in groups.items()
        if len(ch) > 1
    ]
    if lab_name is not None:
        no_label = sorted(set(groups) - set(labels))
        no_image = sorted(set(labels) - set(groups))
        if no_label:
            problems.append(f"{root / lab_name}: no label for image case ids {no_label[:20]}")
        if no_image:
            problems.append(f"{img_dir}: no image for label case ids {no_image[:20]}")
    if problems:
        raise DatasetError(problems)
    items = []
    for case in sorted(groups):
        item = {"image": str(groups[case][0])}
        if lab_name is not None:
            item["label"] = str(labels[case])
        item["case_id"] = case
        items.append(item)
    return items


# ----------------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------------


def _groups(datalist: Sequence[Mapping], group_key: str | None) -> tuple[list[str], list[str]]:
    keys = []
    for i, d in enumerate(datalist):
        if group_key is not None:
            if group_key not in d:
                raise ValueError(f"datalist entry {i} has no {group_key!r} to group by: {dict(d)}")
            keys.append(str(d[group_key]))
        elif "case_id" in d:
            keys.append(str(d["case_id"]))
        elif "image" in d:
            keys.append(case_id_from_path(d["image"]))
        else:
            raise ValueError(f"datalist entry {i} has neither 'case_id' nor 'image': {dict(d)}")
    return keys, sorted(set(keys))


def split_folds(
    datalist: Sequence[Mapping], n_folds: int = 5, seed: int = 0, group_key: str | None = None
) -> list[tuple[list[dict], list[dict]]]:
    """Deterministic k-fold split: ``[(train, val), ...]``, each case in exactly one ``val``.

    Folds depend only on the case ids (or ``group_key`` values, e.g. a patient id, so that scans of one patient
    share a fold) and ``seed``, not on the order of ``datalist``: the stage-1 out-of-fold predictions that train
    stage 2 stay reproducible. Fold sizes differ by at most one group; entries keep their datalist order.

    >>> cases = [{"case_id": f"c{i}"} for i in range(10)]
    >>> [len(val) for _, val in split_folds(cases, n_folds=3)]
    [4, 3, 3]
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    keys, groups = _groups(datalist, group_key)
    if len(groups) < n_folds:
        raise ValueError(f"{len(groups)} case groups cannot fill {n_folds} folds")
    sizes = {g: keys.count(g) for g in groups}
    fold_of: dict[str, int] = {}
    load = [0] * n_folds
    for idx in np.random.default_rng(seed).permutation(len(groups)):
        g = groups[idx]
        f = int(np.argmin(load))
        fold_of[g] = f
        load[f] += sizes[g]
    out = []
    for f in range(n_folds):
        val = [dict(d) for d, k in zip(datalist, keys, strict=True) if fold_of[k] == f]
        train = [dict(d) for d, k in zip(datalist, keys, strict=True) if fold_of[k] != f]
        out.append((train, val))
    return out


def train_val_split(
    datalist: Sequence[Mapping], val_fraction: float = 0.2, seed: int = 0, group_key: str | None = None
) -> tuple[list[dict], list[dict]]:
    """Deterministic hold-out split by case id (or ``group_key``): ``round(val_fraction * groups)``, at least one.

    >>> train, val = train_val_split([{"case_id": f"c{i}"} for i in range(10)], val_fraction=0.2)
    >>> len(train), len(val)
    (8, 2)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    keys, groups = _groups(datalist, group_key)
    if len(groups) < 2:
        raise ValueError(f"{len(groups)} case group(s) cannot be split into training and validation")
    n_val = min(len(groups) - 1, max(1, round(val_fraction * len(groups))))
    perm = np.random.default_rng(seed).permutation(len(groups))
    val_groups = {groups[i] for i in perm[:n_val]}
    train = [dict(d) for d, k in zip(datalist, keys, strict=True) if k not in val_groups]
    val = [dict(d) for d, k in zip(datalist, keys, strict=True) if k in val_groups]
    return train, val


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def folds(
    dataset_json: str,
    n_folds: int = 5,
    seed: int = 0,
    key: str = "training",
    from_folders: bool = False,
    output: str | None = None,
) -> None:
    """Print (or write to ``output`` as JSON) the case ids of each fold's validation set (command ``folds``)."""
    datalist = load_datalist(dataset_json, key=key, from_folders=as_bool(from_folders, "from_folders"))
    result = {
        f"fold{i}": [d["case_id"] for d in val] for i, (_, val) in enumerate(split_folds(datalist, n_folds, seed))
    }
    text = json.dumps(result, indent=1)
    if output:
        from custom.outputs import atomic_write_text

        atomic_write_text(output, text + "\n")
    print(text)


def main() -> None:
    import fire

    from custom.verify import verify

    fire.Fire({"verify": verify, "folds": folds})


if __name__ == "__main__":
    main()
