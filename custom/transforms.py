"""Intensity transforms that MONAI lacks: normalisation statistics taken inside a mask.

The default of this bundle is a fixed window (-500..500 HU to -1..1 with MONAI's ``ScaleIntensityRanged``), so that
the constant used to pad image borders (-1, air) is the same for every case. The authors' code instead clips to
-500..500 HU and subtracts the mean inside the body mask (stage 1); :class:`MaskedStandardized` reproduces that choice
(use ``"padding_mode": "replicate"`` in the inferer with it, since the value of air then varies per case).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform


class MaskedStandardize(Transform):
    """Clip to ``window``, then subtract the mean (and optionally divide by the std) of the voxels inside ``mask``.

    >>> img = torch.tensor([[[[-1000.0, 0.0, 100.0]]]]); m = torch.tensor([[[[0, 1, 1]]]])
    >>> MaskedStandardize(window=(-500, 500), divide_std=False)(img, m).flatten().tolist()
    [-550.0, -50.0, 50.0]
    """

    def __init__(self, window: tuple[float, float] = (-500.0, 500.0), divide_std: bool = True, eps: float = 1e-6):
        self.window = (float(window[0]), float(window[1]))
        self.divide_std = divide_std
        self.eps = eps

    def __call__(self, img: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.as_tensor(img).float().clamp(*self.window)
        sel = out[torch.as_tensor(mask).bool()] if mask is not None else out.reshape(-1)
        if sel.numel() == 0:  # empty mask: fall back to the whole image
            sel = out.reshape(-1)
        out = out - sel.mean()
        if self.divide_std:
            out = out / (sel.std(unbiased=False) + self.eps)
        if isinstance(img, MetaTensor) and not isinstance(out, MetaTensor):
            out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return out


class MaskedStandardized(MapTransform):
    """Dictionary wrapper of :class:`MaskedStandardize`; ``mask_key`` names the mask (e.g. the body mask ``"c1"``)."""

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "c1",
        window: tuple[float, float] = (-500.0, 500.0),
        divide_std: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.op = MaskedStandardize(window=window, divide_std=divide_std)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key], d.get(self.mask_key))
        return d


MaskedStandardizeD = MaskedStandardizeDict = MaskedStandardized
