"""The cascade at inference: stage 1 inside C1, C2 from its dilated foreground, stage 2 inside C2, back to the input.

:class:`CascadeInferer` chains the two tiled inferers (a MONAI ``Inferer``) and makes C2 with
:class:`custom.candidates.CandidateRegiond`; :func:`nearest_to_input_grid` brings a working-grid label map back to the
input's voxel grid (used by :class:`custom.postprocess.ToInputGridd`). Every output is in the input's own geometry
(same voxel order, shape and affine). Probabilities are never resampled back unless asked: labels are taken by argmax
at the working resolution and resampled with nearest neighbour, as the paper does for labels. The run over many cases
(``inference.json``'s evaluator, dataset and batch preparation) is :mod:`custom.evaluator`; out-of-fold C2 is
:mod:`custom.out_of_fold`. Their classes are re-exported here for configs written before the split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from custom.candidates import CandidateRegiond
from custom.options import as_bool

logger = logging.getLogger(__name__)


def _as_mask_tensor(array: np.ndarray, like: torch.Tensor) -> MetaTensor:
    t = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.uint8)
    meta = dict(like.meta) if isinstance(like, MetaTensor) else {}
    ops = list(like.applied_operations) if isinstance(like, MetaTensor) else []
    return MetaTensor(t, meta=meta, applied_operations=ops)


def nearest_to_input_grid(labels: torch.Tensor | np.ndarray, image: MetaTensor) -> np.ndarray | None:
    """A working-grid label map (1, X, Y, Z) back on the input's voxel grid by nearest neighbour, as index gathers.

    When the input grid and the working grid are axis-aligned (the affine from input voxels to working voxels is a
    scaled permutation: orientation flips, axis swaps, resampling, crops and pads; no rotation), every input voxel's
    nearest working voxel follows from one index per axis, so the resampling is three gathers instead of a
    full-resolution interpolation grid: ~0.1 s instead of ~6-14 s for 512x512x400 on a 2-core CPU, and the same
    voxels as ``Invertd(nearest_interp=True)`` except at exact ties (an input voxel midway between two working voxels:
    both are nearest; here ties round half to even in float64, Invertd's float32 grid may pick the other one). Returns
    None when it does not apply (oblique grids, input voxels beyond the working grid's border voxels, missing
    metadata): the caller then uses ``Invertd``.
    """
    meta = getattr(image, "meta", None) or {}
    if "original_affine" not in meta or "spatial_shape" not in meta:
        return None
    a_in = np.asarray(meta["original_affine"], dtype=np.float64)
    a_work = np.asarray(image.affine, dtype=np.float64)
    shape = [int(s) for s in np.asarray(meta["spatial_shape"]).tolist()]
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    arr = arr[0] if arr.ndim == 4 else arr
    if a_in.shape != (4, 4) or a_work.shape != (4, 4) or arr.ndim != 3 or len(shape) != 3:
        return None
    m = np.linalg.inv(a_work) @ a_in  # input voxel index -> working voxel index
    rot = m[:3, :3]
    src = np.argmax(np.abs(rot), axis=1)  # the input axis each working axis follows
    if sorted(src.tolist()) != [0, 1, 2]:
        return None
    off = rot.copy()
    off[np.arange(3), src] = 0.0
    if np.abs(off).max() > 1e-6 * np.abs(rot).max():
        return None
    g = arr
    for a in range(3):
        pos = rot[a, src[a]] * np.arange(shape[src[a]]) + m[a, 3]
        n = arr.shape[a]
        if pos.min() < -0.5 - 1e-6 or pos.max() > n - 0.5 + 1e-6:
            return None  # input voxels beyond the working grid's border voxels
        idx = np.clip(np.rint(pos).astype(np.int64), 0, n - 1)  # a tie at the border: the voxel inside
        g = np.take(g, idx, axis=a)  # working axis a now runs over input axis src[a]
    return np.ascontiguousarray(np.transpose(g, np.argsort(src)), dtype=np.uint8)


class CascadeInferer(Inferer):
    """Stage 1 (inside C1) → C2 = dilated stage-1 foreground ∩ C1 → stage 2 (inside C2).

    ``__call__(inputs, network, mask=c1)`` returns the stage-2 probabilities (B, K, ...); ``network`` is the stage-2
    network (so MONAI's evaluator can own it), ``stage1_network`` is held here. After a call, ``last_outputs`` holds
    ``stage1`` (argmax labels), ``c2`` and one argmax label map per ``stage2_variants`` entry as (B, 1, ...) uint8
    MetaTensors with the input's meta, and ``last_stats`` the per-stage tile counts, candidate fractions, seconds and
    organ flags. With ``stage1_only`` the stage-2 network is never run and the stage-1 probabilities are returned.

    C2 is ``candidates``, a :class:`custom.candidates.CandidateRegiond` (keys ``stage1``, body key ``c1``, output
    ``c2``) as ``inference.json`` declares it: the one implementation of C2, with its fallback for organs that stage 1
    missed or made implausibly small (``labels`` + ``min_ml``). Without one, it is built from ``radius``, ``element``,
    ``labels`` and ``min_organ_ml`` (fallback ``"c1"`` when ``min_organ_ml`` is given, else none).
    ``c2_source="label"`` takes C2 from the dilated ground truth (the authors' code, for training stage 2): the
    evaluator's batch preparation then passes ``label=`` to the call.
    """

    def __init__(
        self,
        stage1_network: torch.nn.Module,
        stage1_inferer: Inferer,
        stage2_inferer: Inferer,
        radius: int = 3,
        element: str = "ball",
        labels: Mapping[str, int] | None = None,
        min_organ_ml: float | Mapping[str, float] | None = None,
        spacing: Sequence[float] | None = None,
        candidates: CandidateRegiond | None = None,
        stage2_variants: Mapping[str, Inferer] | None = None,
        stage1_only: bool = False,
        c2_source: str = "prediction",
    ):
        super().__init__()
        self.stage1_network = stage1_network
        self.stage1_inferer = stage1_inferer
        self.stage2_inferer = stage2_inferer
        if candidates is None:
            use_flags = labels is not None and min_organ_ml is not None
            candidates = CandidateRegiond(
                "stage1",
                body_key="c1",
                output_key="c2",
                radius=radius,
                element=element,
                labels=dict(labels) if use_flags else None,
                min_ml=min_organ_ml if use_flags else 0.0,
                fallback="c1" if use_flags else "none",
            )
        self.c2_transform = candidates
        self.spacing = spacing
        self.stage2_variants = dict(stage2_variants or {})
        self.stage1_only = as_bool(stage1_only, "stage1_only")
        if c2_source not in ("prediction", "label"):
            raise ValueError(f"c2_source must be 'prediction' (paper) or 'label' (authors' code), got {c2_source!r}")
        self.c2_source = c2_source
        self.last_outputs: dict[str, torch.Tensor] = {}
        self.last_stats: dict = {}

    def stage1_probabilities(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        prob = self.stage1_inferer(inputs, self.stage1_network, mask=mask)
        self.last_stats["stage1"] = {
            **getattr(self.stage1_inferer, "last_stats", {}),
            "seconds": time.perf_counter() - t0,
        }
        return prob

    def stage1(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        labels = self.stage1_probabilities(inputs, mask).argmax(1, keepdim=True).to(torch.uint8)
        self.last_stats["stage1"]["seconds"] = time.perf_counter() - t0
        return labels

    def _affine(self, t: torch.Tensor, b: int) -> torch.Tensor:
        """Item ``b``'s affine (organ volumes of the fallback check); ``spacing`` overrides the voxel size."""
        if self.spacing is not None:
            return torch.diag(torch.tensor([*map(float, self.spacing), 1.0], dtype=torch.float64))
        if isinstance(t, MetaTensor):
            aff = torch.as_tensor(t.affine, dtype=torch.float64).cpu()
            return aff[b] if aff.ndim == 3 else aff
        return torch.eye(4, dtype=torch.float64)

    def candidates(
        self, stage1_labels: torch.Tensor, mask: torch.Tensor | None = None, like: torch.Tensor | None = None
    ) -> torch.Tensor:
        """C2 for each batch item through ``c2_transform`` (``CandidateRegiond``), on the CPU."""
        t0 = time.perf_counter()
        like = stage1_labels if like is None else like
        out, flags, fallback = [], [], []
        for b in range(stage1_labels.shape[0]):
            lab = stage1_labels[b].detach().cpu()
            lab = lab.as_tensor() if isinstance(lab, MetaTensor) else lab
            item = {"stage1": MetaTensor(lab, affine=self._affine(like, b))}
            if mask is not None:
                item["c1"] = mask[b].detach().cpu()
            elif self.c2_transform.body_key is not None:
                item[self.c2_transform.body_key] = torch.ones_like(item["stage1"].as_tensor(), dtype=torch.uint8)
            c2 = self.c2_transform(item)[self.c2_transform.output_key]
            names = [f for f in str(c2.meta.get("c2_flags", "")).split(",") if f]
            flags.append(names if self.c2_transform.labels is not None else [])
            fallback.append(bool(c2.meta.get("c2_fallback", False)))
            if not c2.any():  # nothing to crop or tile: stage 2 runs no tile and the case comes out as background
                logger.warning(
                    "stage 1 found no foreground%s: C2 is empty, stage 2 is skipped and the output is background",
                    f" (batch item {b})" if stage1_labels.shape[0] > 1 else "",
                )
            out.append(c2.as_tensor().to(torch.uint8).reshape(stage1_labels.shape[1:]))
        c2 = torch.stack(out)
        self.last_stats["c2"] = {
            "seconds": time.perf_counter() - t0,
            "fraction": float(c2.float().mean()),
            "flags": flags,
            "fallback": fallback,
        }
        return c2

    def stage2(self, inputs, network, c2, inferer: Inferer | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        inferer = inferer or self.stage2_inferer
        prob = inferer(inputs, network, mask=c2.to(inputs.device))
        self.last_stats["stage2"] = {**getattr(inferer, "last_stats", {}), "seconds": time.perf_counter() - t0}
        return prob

    def __call__(
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module | None,
        mask: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
        **kwargs,
    ):
        self.last_stats = {}
        prob1 = self.stage1_probabilities(inputs, mask)
        lab1 = prob1.argmax(1, keepdim=True).to(torch.uint8)
        if self.c2_source == "label":
            if label is None:
                raise ValueError("c2_source='label' needs the case's label (load_keys image and label)")
            c2 = self.candidates(label.round().to(torch.uint8), mask, like=inputs)
        else:
            c2 = self.candidates(lab1, mask, like=inputs)
        outputs = {"stage1": _as_mask_tensor(lab1.cpu().numpy(), inputs), "c2": _as_mask_tensor(c2.numpy(), inputs)}
        if self.stage1_only:
            self.last_outputs = outputs
            return prob1
        del prob1
        stats = dict(self.last_stats)
        for name, inferer in self.stage2_variants.items():
            p = self.stage2(inputs, network, c2, inferer)
            stats[name] = self.last_stats.pop("stage2")
            outputs[name] = _as_mask_tensor(p.argmax(1, keepdim=True).to(torch.uint8).cpu().numpy(), inputs)
            del p
        prob = self.stage2(inputs, network, c2)
        self.last_stats = {**stats, "stage2": self.last_stats["stage2"]}
        self.last_outputs = outputs
        return prob


def output_set(save: Sequence[str] | str | None) -> list[str]:
    """``save_outputs`` checked: any of ``probabilities``, ``c1``, ``stage1``, ``c2``, ``qc``, ``preview``."""
    save = [save] if isinstance(save, str) else list(save or [])
    unknown = sorted(set(save) - set(OPTIONAL_OUTPUTS))
    if unknown:
        raise ValueError(f"unknown outputs to save: {unknown}; choose from {list(OPTIONAL_OUTPUTS)}")
    return save


OPTIONAL_OUTPUTS = ("probabilities", "c1", "stage1", "c2", "qc", "preview")


# configs written before the split name these as custom.cascade.<name>
from custom.evaluator import CascadeEvaluator, CascadePrepareBatch, CaseDataset  # noqa: E402
from custom.out_of_fold import OutOfFoldRunner  # noqa: E402

__all__ = [
    "OPTIONAL_OUTPUTS",
    "CascadeInferer",
    "nearest_to_input_grid",
    "output_set",
    "CascadeEvaluator",
    "CascadePrepareBatch",
    "CaseDataset",
    "OutOfFoldRunner",
]
