"""Postprocessing of the cascade's outputs, as ``inference.json`` declares it: back to the input grid, then written.

- :class:`ToInputGridd` brings working-grid maps back onto the input's own voxel grid (same voxel order, shape and
  affine as the input file): label maps by nearest neighbour as three index gathers
  (:func:`custom.cascade.nearest_to_input_grid`) when the grids are axis-aligned, by MONAI's ``Invertd`` (nearest)
  otherwise (oblique inputs); probabilities by ``Invertd`` with linear interpolation.
- :class:`SaveCased` is MONAI's ``SaveImaged`` (its writers, dtype and channel handling) with what batch inference
  needs on top: the file is named after the case id (``<output_dir>/<case_id>_<postfix>.nii.gz``), written to a
  temporary file in the same folder and then moved into place (a reader never sees a half-written file), and an
  existing file is never replaced unless ``overwrite`` (also against a file that appeared during the run).

Example (a JSON edit, no Python: an extra config file that keeps the largest liver component on the working grid,
through ``inference.json``'s ``label_postprocessing`` hook, and names the output ``<case>_organs.nii.gz``)::

    {"label_postprocessing": [{"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [3]}],
     "output_postfix": "organs"}
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Invertd, MapTransform, SaveImaged

from custom.cascade import nearest_to_input_grid
from custom.outputs import atomic_write, path_inside, safe_case_id

__all__ = ["ToInputGridd", "SaveCased"]


def _input_geometry(ref: MetaTensor) -> tuple[np.ndarray, list[int]]:
    meta = getattr(ref, "meta", {}) or {}
    aff = meta.get("original_affine", getattr(ref, "affine", None))
    affine = np.asarray(aff.cpu() if isinstance(aff, torch.Tensor) else aff, dtype=np.float64)
    shape = [int(s) for s in np.asarray(meta.get("spatial_shape", ref.shape[1:])).tolist()]
    return affine, shape


class ToInputGridd(MapTransform):
    """``d[key]`` (working grid, (C, X, Y, Z)) back on the input's grid, the geometry taken from ``d[ref_key]``.

    ``ref_key`` is the preprocessed image (its meta holds ``original_affine`` and ``spatial_shape``, its applied
    operations the preprocessing to invert). With ``nearest=True`` the maps are label maps (uint8 out): index gathers
    where the grids are axis-aligned, ``Invertd(nearest_interp=True)`` otherwise; with ``nearest=False``
    (probabilities) ``Invertd`` with linear interpolation (float32 out). ``working_postfix`` keeps the working-grid map
    under ``<key>_<postfix>`` (the preview and the C2 recall rows are made on the working grid). The result is a
    MetaTensor whose ``affine`` is the input's affine and which carries no pending operation: a writer stores it as
    it is.
    """

    timing_name = "resample_back"

    def __init__(
        self,
        keys: KeysCollection,
        transform: Any,
        ref_key: str = "image",
        nearest: bool = True,
        working_postfix: str | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.transform = transform
        self.ref_key = ref_key
        self.nearest = bool(nearest)
        self.working_postfix = working_postfix

    def _invert(self, value: torch.Tensor, ref: MetaTensor, key: str) -> np.ndarray:
        t = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
        t = MetaTensor(t.float().cpu(), meta=dict(ref.meta), applied_operations=list(ref.applied_operations))
        inv = Invertd(keys=key, transform=self.transform, orig_keys=self.ref_key, nearest_interp=self.nearest)
        res = inv({self.ref_key: ref, key: t})[key]
        arr = res.detach().cpu().numpy() if isinstance(res, torch.Tensor) else np.asarray(res)
        return np.asarray(np.rint(arr), dtype=np.uint8) if self.nearest else arr.astype(np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        affine, shape = _input_geometry(ref)
        for key in self.key_iterator(d):
            value = d[key]
            if self.working_postfix:
                d[f"{key}_{self.working_postfix}"] = value
            arr = nearest_to_input_grid(value, ref) if self.nearest else None
            if arr is None:
                arr = self._invert(value, ref, str(key))
            else:
                arr = arr[None]
            meta = {
                "affine": torch.as_tensor(affine, dtype=torch.float64),
                "original_affine": torch.as_tensor(affine, dtype=torch.float64),
                "spatial_shape": np.asarray(shape),
                "filename_or_obj": ref.meta.get("filename_or_obj", ""),
            }
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr)), meta=meta)
        return d


class SaveCased(SaveImaged):
    """``SaveImaged`` to ``<output_dir>/<case_id>_<output_postfix><output_ext>``: atomic, never clobbering.

    Args:
        keys: what to write; each key's array must be channel-first (C, X, Y, Z), its MetaTensor affine the one to
            store (after :class:`ToInputGridd`: the input's).
        output_dir, output_postfix, output_ext, output_dtype, writer...: as ``SaveImaged`` (``output_dtype`` default
            uint8: label maps; ``None`` keeps the array's type). ``resample`` is off: the data are already on the
            grid they are stored on.
        case_key: the item's key holding the case id (``case_id``, from :func:`custom.workflow.inference_datalist`).
        overwrite: replace an existing file (else ``FileExistsError`` naming it).

    :meth:`planned_outputs` names the files it would write for a case, so that the evaluator can refuse existing
    outputs before any case is computed.
    """

    timing_name = "write"

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike = "./",
        output_postfix: str = "seg",
        output_ext: str = ".nii.gz",
        output_dtype: Any = np.uint8,
        case_key: str = "case_id",
        overwrite: bool = False,
        print_log: bool = False,
        **kwargs: Any,
    ):
        from custom.options import as_bool

        kwargs.pop("resample", None)
        super().__init__(
            keys,
            output_dir=output_dir,
            output_postfix=output_postfix,
            output_ext=output_ext,
            output_dtype=output_dtype,
            resample=False,
            separate_folder=False,
            print_log=print_log,
            **kwargs,
        )
        if len(self.keys) != 1:
            raise ValueError(f"SaveCased writes one key per file name, got {self.keys}: use one SaveCased per key")
        self.output_dir = Path(str(output_dir))  # --output_dir 20241201 arrives as an int
        self.output_postfix = output_postfix
        self.output_ext = output_ext
        self.case_key = case_key
        self.overwrite = as_bool(overwrite, "overwrite")

    def path(self, case_id: str) -> Path:
        name = f"{safe_case_id(str(case_id), 'case id')}_{self.output_postfix}{self.output_ext}"
        return path_inside(self.output_dir, name)

    def planned_outputs(self, case_id: str) -> list[Path]:
        return [self.path(case_id)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case_id = d[self.case_key]
        # a case recomputed by --skip_existing true whose earlier outputs were incomplete replaces them
        overwrite = self.overwrite or d.get("replace_partial") == "yes"
        for key in self.key_iterator(d):
            path = self.path(str(case_id))
            with atomic_write(path, overwrite=overwrite, suffix=self.output_ext) as tmp:
                img = d[key]
                base = str(tmp)[: -len(self.output_ext)]  # the writer appends output_ext
                self.saver(img=img, meta_data=img.meta if isinstance(img, MetaTensor) else None, filename=base)
                _keep_input_qform(tmp, d.get("input_header"))
        return d


def _keep_input_qform(path: Path, header: Any) -> None:
    """Give the written NIfTI the input's qform and the codes of its qform and sform (MONAI's writer sets both to the
    affine with code 1). Only for NIfTI inputs (``input_header`` from :class:`custom.evaluator.CaseDataset`) whose
    header differs from what was written; the data are on the input's grid, so the input's matrices apply as they
    are."""
    if not header or not str(path).endswith((".nii", ".nii.gz")):
        return
    h = json.loads(header) if isinstance(header, str) else header  # "null" for DICOM inputs
    if not isinstance(h, Mapping) or h.get("qform") is None:
        return
    import nibabel as nib

    img = nib.load(str(path))
    qform, qcode = np.asarray(h["qform"], dtype=np.float64), int(h["qform_code"])
    scode = int(h["sform_code"]) or 1
    if np.allclose(img.header.get_qform(), qform, rtol=0.0, atol=1e-4) and int(img.header["qform_code"]) == qcode:
        if int(img.header["sform_code"]) == scode:
            return
    data = np.asanyarray(img.dataobj)
    out = nib.Nifti1Image(data, img.affine, header=img.header)
    out.set_sform(img.affine, code=scode)
    out.set_qform(qform, code=qcode)
    nib.save(out, str(path))
