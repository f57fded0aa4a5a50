"""Dataset verification: every problem of a training dataset's images and labels, found before training.

A wrong label value, a label resampled with linear interpolation, or an image paired with another case's label trains
a worse network without any error. :func:`verify_dataset` (after nnU-Net's ``verify_dataset_integrity``) finds these
before training and reports ALL problems at once, each naming the file; ``train.json``'s ``initialize`` runs it.
The datalist it checks comes from :func:`custom.data.load_datalist`.

Command line (also ``python -m custom.data verify``)::

    python -m custom.verify --dataset_json /data/Task07/dataset.json --labels paper
    python -m custom.verify --dataset_json /data/btcv/dataset.json --labels paper --source_labels btcv
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from custom.data import DatasetError, _read_json, case_id_from_path, load_datalist
from custom.labels import LABEL_SETS, REAL_CT_LABELS, resolve_labels
from custom.nifti_io import describe_read_error, nifti_header_problems
from custom.options import as_bool

__all__ = ["VerifyReport", "label_disagreements", "mapping_report", "verify", "verify_dataset"]

logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """What :func:`verify_dataset` found. ``errors`` stop training; ``warnings`` deserve a look."""

    n_cases: int
    n_checked: int
    labels: dict[str, int]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: number of checked cases whose label file contains each label name
    cases_with_label: dict[str, int] = field(default_factory=dict)
    #: with ``source_labels``: the mapping report of :func:`mapping_report` (lines), else empty
    mapping: list[str] = field(default_factory=list)
    #: label values found that ``source_labels`` does not map: {value: number of cases}
    unmapped: dict[int, int] = field(default_factory=dict)
    #: structures of the label set that the dataset does not label (``source_labels``) or that no checked case has
    absent: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        lines = [f"checked {self.n_checked} of {self.n_cases} cases: {len(self.errors)} error(s), "
                 f"{len(self.warnings)} warning(s)"]  # fmt: skip
        if self.cases_with_label:
            counts = ", ".join(f"{name} {n}" for name, n in self.cases_with_label.items())
            lines.append(f"cases containing each label: {counts}")
        lines += self.mapping
        lines += [f"ERROR {e}" for e in self.errors] + [f"WARNING {w}" for w in self.warnings]
        return "\n".join(lines)


def _labels_from_json(data: Mapping) -> dict[str, int] | None:
    raw = data.get("labels")
    if not isinstance(raw, Mapping) or not raw:
        return None
    try:
        if all(str(k).lstrip("-").isdigit() for k in raw):  # MSD: {"0": "background", "1": "pancreas"}
            pairs = {str(v): int(k) for k, v in raw.items()}
        else:  # nnU-Net v2: {"background": 0, "pancreas": 1}
            pairs = {str(k): int(v) for k, v in raw.items() if not isinstance(v, (list, tuple))}
    except (TypeError, ValueError):
        return None
    pairs.pop("background", None)
    return pairs


def _as_labels(labels: str | Mapping[str, int] | Sequence[str] | None, data: Mapping | None) -> dict[str, int]:
    if labels is None:
        found = _labels_from_json(data or {})
        if not found:
            raise ValueError("no label set given and none found in dataset.json ('labels')")
        return found
    if isinstance(labels, str):
        if labels in ("real", "real_ct"):
            return dict(REAL_CT_LABELS)
        if labels in LABEL_SETS:
            return resolve_labels(labels)
        raise ValueError(f"unknown label set {labels!r}; known: {sorted(LABEL_SETS) + ['real']}")
    if isinstance(labels, Mapping):
        return {str(k): int(v) for k, v in labels.items()}
    return resolve_labels(labels)


def _header(path: Path, what: str, errors: list[str]) -> Any:
    if not path.is_file():
        errors.append(f"{path}: {what} file not found")
        return None
    try:
        return nib.load(path)
    except Exception as e:  # every read failure is reported, not raised: all problems at once
        errors.append(f"{path}: unreadable {what} ({describe_read_error(e, path)})")
        return None


def _spatial(img: Any, path: Path, what: str, errors: list[str]) -> tuple[int, ...] | None:
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        errors.append(f"{path}: {what} is {len(shape)}D {shape}, expected a 3D volume")
        return None
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        errors.append(f"{path}: {what} is a {len(shape)}D series {shape}, expected one 3D volume")
        return None
    return shape[:3]


def _label_values(arr: np.ndarray, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray | None]:
    """Distinct values of a label array and its non-integer values (``None`` if all are integers).

    Works slab by slab (``chunk`` voxels) with ``bincount``: a 512 x 512 x 500 label costs ~0.2 GB, not ~1 GB.
    """
    flat = arr.reshape(-1)
    floating = np.issubdtype(arr.dtype, np.floating)
    narrow = np.issubdtype(arr.dtype, np.unsignedinteger) and arr.dtype.itemsize <= 2  # always in [0, 65536)
    counts = np.zeros(0, dtype=np.int64)
    others: set[float] = set()
    bad: set[float] = set()
    for start in range(0, flat.size, chunk):
        part = flat[start : start + chunk]
        if floating:
            off = ~np.isfinite(part) | (part != np.round(part))
            if off.any():
                bad.update(np.unique(part[off])[:10].tolist())
                part = part[~off]
            part = part.astype(np.int64)
        small = True if narrow else (part >= 0) & (part < 1 << 16)
        if not np.all(small):
            others.update(np.unique(part[~small]).tolist())
            part = part[small]
        if part.size:
            c = np.bincount(part.astype(np.intp, copy=False))
            if c.size > counts.size:
                c[: counts.size] += counts
                counts = c
            else:
                counts[: c.size] += c
    values = np.union1d(np.flatnonzero(counts), np.asarray(sorted(others), dtype=np.int64))
    return values, (np.asarray(sorted(bad, key=lambda v: (np.isnan(v), v))[:10]) if bad else None)


def _data_complete(img: Any, path: Path) -> str | None:
    """Why the voxel data of a NIfTI file cannot all be there, from its size alone (no decompression), or ``None``.

    A plain ``.nii`` must hold ``vox_offset`` + the voxel bytes. A ``.nii.gz`` stores its uncompressed size (mod
    2^32) in its last 4 bytes: a cut file ends in arbitrary bytes instead. Only then is it decompressed (a file
    of several gzip members legitimately stores the last member's size there).
    """
    try:
        hdr = img.header
        offset = int(getattr(img.dataobj, "offset", hdr.get_data_offset()))  # the header copy may say 0
        expected = offset + int(np.prod(img.shape)) * hdr.get_data_dtype().itemsize
        size = path.stat().st_size
        if not str(path).lower().endswith(".gz"):
            if size < expected:
                return f"truncated NIfTI: {size} bytes, the header says {expected} (interrupted download or copy?)"
            return None
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
    except (OSError, ValueError, AttributeError):
        return None
    if isize == expected % (1 << 32):
        return None
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            n = 0
            while chunk := f.read(1 << 24):
                n += len(chunk)
    except EOFError:
        return "truncated gzip: the compressed data end before the image does (interrupted download or copy?)"
    except (OSError, zlib.error) as e:
        return f"corrupt gzip data ({e})"
    if n < expected:
        return f"truncated NIfTI: {n} bytes uncompressed, the header says {expected}"
    return None


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def _same_structure(a: str, b: str) -> bool:
    # "portal_vein" and "portal vein and splenic vein", "gall" and "gallbladder": one name extends the other
    a, b = _norm_name(a), _norm_name(b)
    return bool(a and b) and (a == b or a.startswith(b) or b.startswith(a))


def label_disagreements(json_labels: Mapping[str, int], label_map: Mapping[str, int]) -> list[str]:
    """Where dataset.json's ``labels`` and the label set used disagree: one name with two values, or one value with
    two names (names compared case- and punctuation-blind; a name extending the other counts as the same).

    >>> label_disagreements({"spleen": 1, "liver": 6}, {"artery": 1, "liver": 3})[0]
    "value 1 is 'spleen' in dataset.json but 'artery' in the label set"
    """
    out = []
    by_value = {v: k for k, v in label_map.items()}
    for name, v in json_labels.items():
        if v in by_value and not _same_structure(name, by_value[v]):
            out.append(f"value {v} is {name!r} in dataset.json but {by_value[v]!r} in the label set")
    for name, v in json_labels.items():
        for own, w in label_map.items():
            if v != w and _same_structure(name, own) and not _same_structure(name, by_value.get(v, "")):
                out.append(f"{name!r} is {v} in dataset.json but {w} in the label set")
    return out


def _same_box(a: np.ndarray, b: np.ndarray, shape: Sequence[int], tol: float) -> bool:
    """Whether two voxel-to-world affines of one voxel grid ``shape`` cover the same box of world space."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    wa, wb = (a @ corners)[:3], (b @ corners)[:3]
    return bool(np.allclose(np.sort(wa, axis=1), np.sort(wb, axis=1), atol=tol))


def _check_case(
    item: Mapping,
    allowed: set[int],
    num_classes: int | None,
    check_geometry: bool,
    images: bool,
    allow_label_flip: bool = False,
    min_slices: int = 8,
):
    errors: list[str] = []
    warns: list[str] = []
    present: set[int] = set()
    img_path, lab_path = Path(item["image"]), Path(item["label"]) if "label" in item else None
    img = _header(img_path, "image", errors)
    lab = _header(lab_path, "label", errors) if lab_path is not None else None
    # what training would refuse with a traceback (the loader's header check, CheckCTd, a cut file) is refused here
    for what, nii, path in (("image", img, img_path), ("label", lab, lab_path)):
        if nii is not None:
            problems = nifti_header_problems(nii)
            if not problems:
                cut = _data_complete(nii, path)
                problems = [f"unreadable {what} ({cut})"] if cut else []
            errors += [f"{path}: {p}" for p in problems]
            if problems:
                if what == "image":
                    img = None
                else:
                    lab = None
    img_shape = _spatial(img, img_path, "image", errors) if img is not None else None
    lab_shape = _spatial(lab, lab_path, "label", errors) if lab is not None else None
    if img_shape and min(img_shape) < min_slices:
        short = ", ".join(f"{ax} = {n}" for ax, n in zip("XYZ", img_shape, strict=True) if n < min_slices)
        errors.append(f"{img_path}: too few slices ({short}; at least {min_slices} needed along every axis)")
    if lab_path is not None and img_path.name != lab_path.name:
        img_digits = re.findall(r"\d+", case_id_from_path(img_path))
        lab_digits = re.findall(r"\d+", case_id_from_path(lab_path, strip_channel=False))
        if img_digits != lab_digits:
            warns.append(f"{lab_path}: label paired with image {img_path.name}: case numbers differ")
    if img_shape and lab_shape:
        if img_shape != lab_shape:
            errors.append(f"{lab_path}: label shape {lab_shape} differs from image shape {img_shape} ({img_path})")
        elif check_geometry:
            zi, zl = np.asarray(img.header.get_zooms()[:3]), np.asarray(lab.header.get_zooms()[:3])
            if not np.allclose(zi, zl, rtol=1e-3, atol=1e-4):
                errors.append(
                    f"{lab_path}: label spacing {np.round(zl.astype(float), 4).tolist()} differs from image spacing "
                    f"{np.round(zi.astype(float), 4).tolist()} ({img_path})"
                )
            ai, al = img.affine, lab.affine
            di, dl = ai[:3, :3] / np.maximum(zi, 1e-12), al[:3, :3] / np.maximum(zl, 1e-12)
            if np.abs(di - dl).max() <= 1e-3:
                if np.abs(ai[:3, 3] - al[:3, 3]).max() > 1e-2:
                    warns.append(
                        f"{lab_path}: label origin {np.round(al[:3, 3], 3).tolist()} differs from image origin "
                        f"{np.round(ai[:3, 3], 3).tolist()}"
                    )
            else:
                codes_i, codes_l = "".join(nib.aff2axcodes(ai)), "".join(nib.aff2axcodes(al))
                if _same_box(ai, al, img_shape, float(zi.max())):
                    # stored in another voxel order but covering the same space: reorienting both aligns them
                    warns.append(
                        f"{lab_path}: label stored in another orientation ({codes_l}) than its image ({codes_i}) over "
                        "the same space; training reorients both"
                    )
                else:
                    message = (
                        f"{lab_path}: label axis directions ({codes_l}) differ from the image's ({codes_i}, "
                        f"{img_path}) and the label does not cover the image's space"
                    )
                    if allow_label_flip:
                        warns.append(message + " (allowed by allow_label_flip)")
                    else:
                        errors.append(
                            message + ": a flipped header. Training reorients each file by its own header, so the "
                            "label would be used mirrored. Fix the label's header (give it the image's affine if its "
                            "voxels line up with the image's), or pass allow_label_flip=true to train as the headers "
                            "say"
                        )
    if lab_shape:
        try:
            arr = np.asanyarray(lab.dataobj)
        except Exception as e:
            errors.append(f"{lab_path}: unreadable label ({describe_read_error(e, lab_path)})")
        else:
            values, non_integer = _label_values(arr)
            if non_integer is not None:
                errors.append(
                    f"{lab_path}: float label with non-integer values {non_integer.tolist()} "
                    "(resampled with linear interpolation?)"
                )
            else:
                present = {int(v) for v in values}
                outside = sorted(present - allowed) if allowed is not None else []
                if outside:
                    errors.append(f"{lab_path}: label values {outside[:20]} are not in the label set {sorted(allowed)}")
                if num_classes is not None and present and max(present) >= num_classes:
                    errors.append(
                        f"{lab_path}: label value {max(present)} needs more classes than the network has "
                        f"(num_classes={num_classes})"
                    )
                if present <= {0}:
                    warns.append(f"{lab_path}: label has no foreground voxel")
    if images and img_shape:
        try:
            data = np.asanyarray(img.dataobj)
        except Exception as e:
            errors.append(f"{img_path}: unreadable image ({describe_read_error(e, img_path)})")
        else:
            finite = np.isfinite(data)
            if not finite.all():
                warns.append(f"{img_path}: {int((~finite).sum())} NaN/infinite voxels")
            if finite.any() and float(data[finite].min()) > -200:
                warns.append(
                    f"{img_path}: intensities [{float(data[finite].min()):g}, {float(data[finite].max()):g}] "
                    "do not look like CT Hounsfield units"
                )
    return errors, warns, present


def _source_mapping(source_labels, label_map: Mapping[str, int]):
    from custom.label_presets import label_mapping

    mapping = label_mapping(source_labels, label_map)
    return mapping if mapping.active else None


def mapping_report(
    report: VerifyReport,
    mapping,
    checked: Sequence[Mapping],
    present: Sequence[set[int]],
    json_labels: Mapping[str, int] | None = None,
) -> VerifyReport:
    """Add what ``source_labels`` does to a dataset to ``report`` (in place; also returned).

    - ``report.mapping``: one line per target structure naming the source ids that feed it, or ABSENT;
    - an error per label file with values the mapping does not know (they would reach the loss unmapped), and
      ``report.unmapped`` = {value: number of cases};
    - a warning naming the structures the dataset does not label (absent: unlabelled, excluded from loss and Dice);
    - a warning when dataset.json's ``labels`` list ids the mapping does not know.
    """
    known = set(mapping.source_ids)
    unmapped: dict[int, int] = {}
    for item, values in zip(checked, present, strict=True):
        extra = sorted(set(values) - known)
        for v in extra:
            unmapped[v] = unmapped.get(v, 0) + 1
        if extra:
            report.errors.append(
                f"{item.get('label', item.get('image'))}: label values {extra[:20]} are not mapped by source_labels "
                f"{mapping.source!r} (it maps {mapping.source_ids}): add them to the mapping"
            )
    report.unmapped = dict(sorted(unmapped.items()))
    report.mapping = [f"source_labels {mapping.source!r} -> label set:"] + [f"  {line}" for line in mapping.describe()]
    if unmapped:
        report.mapping.append(
            "  unmapped values found: " + ", ".join(f"{v} ({n} case(s))" for v, n in report.unmapped.items())
        )
    if mapping.absent:
        report.warnings.append(
            f"structure(s) not labelled by source_labels {mapping.source!r}: {', '.join(mapping.absent)}; they are "
            "treated as unlabelled (absent_classes: merged into background by the loss, Dice NaN), not as background"
        )
    if json_labels:
        extra = sorted(v for v in json_labels.values() if v not in known)
        if extra:
            report.warnings.append(
                f"dataset.json lists label ids {extra} ({', '.join(k for k, v in json_labels.items() if v in extra)}) "
                f"that source_labels {mapping.source!r} does not map"
            )
    return report


def verify_dataset(
    dataset: str | os.PathLike | Sequence[Mapping],
    labels: str | Mapping[str, int] | Sequence[str] | None = None,
    num_classes: int | None = None,
    check_geometry: bool = True,
    max_cases: int | None = None,
    key: str = "training",
    check_images: bool = False,
    num_workers: int = 2,
    raise_on_error: bool = True,
    log: bool = False,
    allow_label_flip: bool = False,
    check_json_labels: bool = True,
    source_labels: str | Mapping | None = None,
) -> VerifyReport:
    """Check a training dataset before training and report every problem at once.

    ``dataset`` is a ``dataset.json`` path or a datalist (from :func:`load_datalist`). ``labels`` is the label set the
    network is trained with (``{"liver": 3, ...}``, a set name ``"paper"``/``"extended"``/``"real"``, or ``None`` for
    the ``labels`` of dataset.json). Errors: missing or unreadable files, image/label shape or spacing mismatch,
    label values outside the label set (listed), float labels with non-integer values, values needing more classes
    than ``num_classes``; what training would refuse with a traceback: a header no CT has (singular or non-finite
    affine, implausible spacing, RGB data; :func:`custom.io.nifti_header_problems`), a file shorter than its header
    says, fewer than 8 slices; a label whose axis directions differ from its image's (a flipped header: training
    would use it mirrored) unless ``allow_label_flip``; dataset.json ``labels`` that disagree with ``labels``
    (:func:`label_disagreements`; ``check_json_labels=False`` when the label files are known to follow ``labels``).
    Warnings: origin differences, labels without foreground, a label never present, images and labels whose case
    numbers differ. Headers are read with nibabel and label voxels fully (needed for the values); image voxels only
    with ``check_images=True`` (NaN and HU range).

    ``source_labels`` (a preset name such as ``"btcv"`` or ``{source_id: name}``, see ``custom.label_presets``): the
    label files carry the dataset's own ids, which training maps to ``labels`` (``labels="dataset"``: the dataset's
    own label set, as ``--labels @dataset_labels`` in the bundle configs); the values are then checked against
    the mapping and the report says what maps where (:func:`mapping_report`): unmapped values are errors, structures
    the dataset does not label (absent: excluded from loss and Dice) and structures no checked case contains are
    warnings.

    Raises :class:`DatasetError` listing all errors (with ``.report``) unless ``raise_on_error=False``. ``log=True``
    (the training configs' ``initialize``) logs the summary line and every warning.

    >>> report = verify_dataset("/data/Task07_Pancreas/dataset.json", {"pancreas": 1, "tumour": 2})  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    """
    allow_label_flip = as_bool(allow_label_flip, "allow_label_flip")
    check_json_labels = as_bool(check_json_labels, "check_json_labels")
    data: Mapping | None = None
    if isinstance(dataset, (str, os.PathLike)):
        src = Path(dataset).expanduser()
        datalist = load_datalist(src, key=key)
        data = _read_json(src / "dataset.json" if src.is_dir() else src)
    else:
        datalist = [dict(d) for d in dataset]
        if not datalist:
            raise DatasetError(["the datalist is empty"])
    if isinstance(labels, str) and labels in ("dataset", "@dataset_labels") and source_labels is not None:
        from custom.label_presets import dataset_labels

        labels = dataset_labels(source_labels)  # the dataset's own label set, as `--labels @dataset_labels` trains
    label_map = _as_labels(labels, data)
    allowed = {0, *label_map.values()}
    errors: list[str] = []
    warns: list[str] = []
    if num_classes is not None and max(allowed) >= num_classes:
        errors.append(f"label set {label_map} needs {max(allowed) + 1} classes but num_classes={num_classes}")
    json_labels = _labels_from_json(data) if data is not None else None
    mapping = _source_mapping(source_labels, label_map)
    if mapping is not None:
        allowed, num_classes = None, None  # raw values are the dataset's own ids: checked by mapping_report
    elif json_labels is not None and labels is not None and json_labels != label_map:
        clash = label_disagreements(json_labels, label_map) if check_json_labels else []
        if clash:
            errors.append(
                f"the label set used {label_map} disagrees with dataset.json's labels {json_labels}: "
                f"{'; '.join(clash)}. Training would give these structures the wrong names: pass labels equal to "
                "dataset.json's to train on its label set, or relabel the files (check_json_labels=false if the "
                "files follow the label set and dataset.json is wrong)"
            )
        else:
            warns.append(f"the label set given {label_map} differs from dataset.json's labels {json_labels}")
    for item in datalist:
        if "image" not in item:
            errors.append(f"datalist entry without 'image': {dict(item)}")
    checked = [d for d in datalist if "image" in d][: max_cases if max_cases is not None else None]
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        results = list(
            pool.map(
                lambda d: _check_case(d, allowed, num_classes, check_geometry, check_images, allow_label_flip), checked
            )
        )
    counts = dict.fromkeys(sorted(label_map, key=label_map.get), 0)
    by_id = {v: k for k, v in label_map.items()}
    for errs, ws, present in results:
        errors += errs
        warns += ws
        mapped = present if mapping is None else {mapping.mapping.get(v, -1) for v in present}
        for v in mapped:
            if v in by_id:
                counts[by_id[v]] += 1
    never_names = [name for name, n in counts.items() if n == 0]
    if mapping is not None:
        never_names = [n for n in never_names if n not in mapping.absent]  # mapping_report names those
    if any("label" in d for d in checked):
        never = [f"{name} ({label_map[name]})" for name in never_names]
        if never:
            warns.append(f"label(s) present in no checked case: {', '.join(never)}")
    report = VerifyReport(len(datalist), len(checked), label_map, errors, warns, counts)
    if mapping is not None:
        mapping_report(report, mapping, checked, [r[2] for r in results], json_labels)
    if any("label" in d for d in checked):
        report.absent = [*(mapping.absent if mapping is not None else []), *never_names]
    if log:
        logger.info("dataset verification: %s", report.summary().splitlines()[0])
        for w in warns:
            logger.warning("dataset verification: %s", w)
    if errors and raise_on_error:
        raise DatasetError(errors, report)
    return report


def verify(
    dataset_json: str,
    labels: str | dict | None = "paper",
    num_classes: int | None = None,
    max_cases: int | None = None,
    key: str = "training",
    from_folders: bool = False,
    check_geometry: bool = True,
    check_images: bool = False,
    num_workers: int = 2,
    allow_label_flip: bool = False,
    check_json_labels: bool = True,
    source_labels: str | dict | None = None,
) -> None:
    """Verify a dataset, print a summary, exit 1 on any error (command ``verify``).

    ``--source_labels btcv`` (or another preset of ``custom.label_presets``, or ``'{"1": "spleen", ...}'``): the
    label files use that dataset's ids; the summary then shows the mapping, unmapped values and absent structures.
    Boolean options take ``true/false`` (any case), ``1/0``, ``yes/no``; anything else is refused by name (fire would
    pass ``--check_geometry false`` as the truthy string ``'false'``).
    """
    try:
        from_folders = as_bool(from_folders, "from_folders")
        check_geometry = as_bool(check_geometry, "check_geometry")
        check_images = as_bool(check_images, "check_images")
        allow_label_flip = as_bool(allow_label_flip, "allow_label_flip")
        check_json_labels = as_bool(check_json_labels, "check_json_labels")
        if from_folders:
            dataset: Any = load_datalist(dataset_json, key=key, from_folders=True)
        else:
            dataset = dataset_json
        report = verify_dataset(
            dataset,
            labels,
            num_classes=num_classes,
            check_geometry=check_geometry,
            max_cases=max_cases,
            key=key,
            check_images=check_images,
            num_workers=num_workers,
            raise_on_error=False,
            allow_label_flip=allow_label_flip,
            check_json_labels=check_json_labels,
            source_labels=source_labels,
        )
    except (DatasetError, ValueError) as e:
        print(f"ERROR {e}", file=sys.stderr)
        sys.exit(1)
    print(report.summary())
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":
    import fire

    fire.Fire(verify)
