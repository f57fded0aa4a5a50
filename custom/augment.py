"""The paper's augmentation (coarse elastic grid, rotation, translation): one batched resampling on the training device.

Roth et al. (section 2.3) deform every training patch with random displacements on a control grid of spacing 32
voxels (uniform, at most +-4 voxels; section 3.1 says normal with sigma 4), rotate it by -5..+5 degrees and translate
it by -20..+20 voxels. MONAI's ``Rand3DElasticd`` smooths a dense random field instead and costs 57 ms per patch on
an H200 (420 ms on 16 CPU cores) against a 16.5 ms training step. Here the three are composed into one sampling grid
and one ``torch.nn.functional.grid_sample`` per batch, on whatever device the batch is on.

For an output voxel at offset ``x`` (voxels, x/y/z) from the patch centre, the box is sampled at

    p(x) = c + t + R x + e(x)

with ``c`` the box centre, ``t`` the translation, ``R`` the rotation (``Rz @ Ry @ Rx``, angles about the x, y and z
axes drawn independently) and ``e`` the elastic displacement: a cubic B-spline (``spline_order=3``, default; or
trilinear, ``spline_order=1``) whose coefficients are the random values on a grid of spacing ``grid_spacing``
centred on the patch. The B-spline approximates rather than interpolates its coefficients, so ``|e| <= max |coef|``:
a uniform ``max_displacement`` of 4 bounds every displacement component by 4 voxels. Rotation and deformation are in
voxel units (the paper's convention; with anisotropic voxels a rotation is not rigid in millimetres).

The image patch (network input) is sampled trilinearly; the label only at the central output region (nearest, so
values come from the input set), so it is already cropped to the network output. Samples outside the box get
``image_pad_value`` and ``label_pad_value`` (255, ignored by the loss). The random parameters come from the
augmentation's own CPU ``torch.Generator`` and are then moved to the device, so a seed gives the same augmentation
on CPU and GPU (under DDP, give each rank its own seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch

from custom.sampling import as_triple

__all__ = ["AugmentParams", "RandElasticRigid3D", "CascadeBatchPreparer", "centre_crop", "rotation_matrix"]

NET_MARGIN = 44  # per side, valid-convolution U-Net of the paper (input 132 -> output 44)


@dataclass
class AugmentParams:
    """Per-sample augmentation parameters (CPU or device tensors).

    rotation (B, 3, 3) acting on (x, y, z) voxel offsets; translation (B, 3) voxels; control (B, 3, nx, ny, nz)
    spline coefficients in voxels (None: no deformation); apply (B,) bool, False = plain centre crop.
    """

    rotation: torch.Tensor
    translation: torch.Tensor
    control: torch.Tensor | None
    apply: torch.Tensor

    @classmethod
    def identity(cls, batch_size: int) -> AugmentParams:
        """Parameters of the identity transform (resampled, not cropped: for checking the geometry)."""
        return cls(
            rotation=torch.eye(3).expand(batch_size, 3, 3).clone(),
            translation=torch.zeros(batch_size, 3),
            control=None,
            apply=torch.ones(batch_size, dtype=torch.bool),
        )


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``Rz @ Ry @ Rx`` from angles (B, 3) in radians about the x, y and z axes.

    >>> rotation_matrix(torch.tensor([[0.0, 0.0, math.pi / 2]])).round().add(0.0).tolist()
    [[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]
    """
    cx, cy, cz = torch.cos(angles).unbind(-1)
    sx, sy, sz = torch.sin(angles).unbind(-1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ ry @ rx


def _check_sizes(patch_size, output_size) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    patch = tuple(int(v) for v in as_triple(patch_size, "patch_size"))
    out = tuple(p - 2 * NET_MARGIN for p in patch) if output_size is None else as_triple(output_size, "output_size")
    out = tuple(int(v) for v in out)
    if any(o <= 0 or o > p or (p - o) % 2 for p, o in zip(patch, out, strict=True)):
        raise ValueError(
            f"output_size {out} must be positive, <= patch_size {patch}, and differ from it by an even number"
        )
    return patch, out, tuple((p - o) // 2 for p, o in zip(patch, out, strict=True))


def centre_crop(
    image: torch.Tensor, label: torch.Tensor | None, patch_size: Sequence[int], output_size: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Crop the centre ``patch_size`` of image boxes (B, C, *S) and the centre ``output_size`` of label boxes.

    Exact (slicing, no interpolation): what validation and a failed ``prob`` give. The label comes back as long.

    >>> img = torch.arange(10.0).reshape(1, 1, 10, 1, 1).expand(1, 1, 10, 3, 3)
    >>> centre_crop(img, None, (6, 1, 1), (2, 1, 1))[0].flatten().tolist()
    [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    """
    patch, out, margin = _check_sizes(patch_size, output_size)
    spatial = tuple(image.shape[2:])
    if len(spatial) != 3 or any(s < p or (s - p) % 2 for s, p in zip(spatial, patch, strict=True)):
        raise ValueError(f"box {spatial} must be patch_size {patch} plus an even number of voxels per axis")
    a = [(s - p) // 2 for s, p in zip(spatial, patch, strict=True)]
    img = image[(..., *(slice(a_, a_ + p) for a_, p in zip(a, patch, strict=True)))]
    if label is None:
        return img, None
    if tuple(label.shape[2:]) != spatial:
        raise ValueError(f"label box {tuple(label.shape[2:])} differs from image box {spatial}")
    lab = label[(..., *(slice(a_ + m, a_ + m + o) for a_, m, o in zip(a, margin, out, strict=True)))]
    return img, lab.long()


def _spline_basis(n: int, spacing: float, order: int) -> tuple[torch.Tensor, int]:
    """Weights (n, k) of ``k`` control points for ``n`` voxels centred on 0, and the first control point's index."""
    u = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / spacing
    reach = 2 if order == 3 else 1
    first = math.floor(float(u.min())) - reach + 1
    last = math.ceil(float(u.max())) + reach - 1
    t = (u[:, None] - torch.arange(first, last + 1, dtype=torch.float64)[None, :]).abs()
    if order == 3:
        w = torch.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, torch.where(t < 2, (2 - t) ** 3 / 6, torch.zeros_like(t)))
    else:
        w = (1 - t).clamp(min=0)
    return w.float(), first


class RandElasticRigid3D:
    """Random coarse-grid elastic deformation + rotation + translation of patch boxes, in one batched resampling.

    Args:
        patch_size: network input size (x, y, z).
        output_size: network output size; default ``patch_size - 88`` (valid U-Net margin 44 per side).
        grid_spacing: control-grid spacing in voxels (paper: 32).
        max_displacement: uniform: coefficients in [-d, d]; normal: their standard deviation (paper: 4).
        distribution: "uniform" (paper section 2.3) or "normal" (section 3.1).
        rotation_degrees: maximum angle about each of the x, y and z axes (paper: 5), one value or three.
        translation: maximum shift in voxels per axis (paper: 20), one value or three.
        prob: probability that a sample is augmented; otherwise it is centre-cropped exactly.
        seed: seed of the augmentation's own generator (None: random).
        spline_order: 3 (cubic B-spline, smooth) or 1 (trilinear) interpolation of the control grid.
        image_pad_value, label_pad_value: values for samples that fall outside the box.
        enabled: False turns the augmentation into the exact centre crop (e.g. for validation).

    ``__call__(image (B, C, *S), label (B, 1, *S) | None)`` with ``S = patch_size + 2 * aug_margin`` returns
    ``(image (B, C, *patch_size) float32, label (B, 1, *output_size) long | None)``. Use :meth:`required_margin`
    for the sampler's ``aug_margin`` so that the transformed patch never leaves the box.

    >>> aug = RandElasticRigid3D(patch_size=(100, 100, 92), seed=0)
    >>> m = aug.required_margin(); box = [p + 2 * a for p, a in zip(aug.patch_size, m)]
    >>> img, lab = aug(torch.rand(2, 1, *box), torch.zeros(2, 1, *box, dtype=torch.uint8))
    >>> tuple(img.shape), tuple(lab.shape), m
    ((2, 1, 100, 100, 92), (2, 1, 12, 12, 4), (32, 33, 33))
    """

    def __init__(
        self,
        patch_size: Sequence[int] = (132, 132, 116),
        output_size: Sequence[int] | None = None,
        grid_spacing: int | Sequence[int] = 32,
        max_displacement: float = 4.0,
        distribution: str = "uniform",
        rotation_degrees: float | Sequence[float] = 5.0,
        translation: float | Sequence[float] = 20.0,
        prob: float = 1.0,
        seed: int | None = None,
        spline_order: int = 3,
        image_pad_value: float = 0.0,
        label_pad_value: int = 255,
        enabled: bool = True,
    ):
        self.patch_size, self.output_size, self.margin = _check_sizes(patch_size, output_size)
        self.grid_spacing = tuple(float(v) for v in as_triple(grid_spacing, "grid_spacing"))
        if min(self.grid_spacing) <= 0:
            raise ValueError(f"grid_spacing must be positive, got {grid_spacing}")
        if distribution not in ("uniform", "normal"):
            raise ValueError(f"distribution must be 'uniform' or 'normal', got {distribution!r}")
        if spline_order not in (1, 3):
            raise ValueError(f"spline_order must be 1 (trilinear) or 3 (cubic B-spline), got {spline_order}")
        if max_displacement < 0 or not 0.0 <= prob <= 1.0:
            raise ValueError(f"need max_displacement >= 0 and 0 <= prob <= 1, got {max_displacement}, {prob}")
        self.max_displacement = float(max_displacement)
        self.distribution = distribution
        self.rotation_degrees = tuple(float(v) for v in as_triple(rotation_degrees, "rotation_degrees"))
        self.translation = tuple(float(v) for v in as_triple(translation, "translation"))
        self.prob = float(prob)
        self.spline_order = int(spline_order)
        self.image_pad_value = float(image_pad_value)
        self.label_pad_value = int(label_pad_value)
        self.enabled = bool(enabled)
        bases = [
            _spline_basis(p, s, self.spline_order) for p, s in zip(self.patch_size, self.grid_spacing, strict=True)
        ]
        self._basis = [w for w, _ in bases]
        self._knots = [
            (first + torch.arange(w.shape[1], dtype=torch.float32)) * sp
            for (w, first), sp in zip(bases, self.grid_spacing, strict=True)
        ]
        self._base_cache: dict[tuple, torch.Tensor] = {}
        self.control_shape = tuple(int(w.shape[1]) for w in self._basis)
        self._device_cache: dict[tuple[str, int | None], list[torch.Tensor]] = {}
        self.generator = torch.Generator()
        self.set_random_state(seed)

    def set_random_state(self, seed: int | None = None) -> RandElasticRigid3D:
        """Reseed the augmentation's generator (None: from system entropy)."""
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        return self

    def required_margin(self, quantile_sigmas: float = 3.0) -> tuple[int, int, int]:
        """Box margin per side (x, y, z) that keeps every image sample inside the box.

        Worst case over the patch corners and the extreme angles, plus the maximum translation and displacement
        (for "normal", ``quantile_sigmas`` standard deviations of a coefficient, which bounds the field).
        """
        lim = torch.tensor(self.rotation_degrees, dtype=torch.float64) * math.pi / 180
        steps = torch.linspace(-1, 1, 5, dtype=torch.float64)
        angles = torch.cartesian_prod(steps, steps, steps) * lim
        half = torch.tensor([(p - 1) / 2 for p in self.patch_size], dtype=torch.float64)
        signs = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * 3)
        corners = signs * half
        rotated = torch.einsum("nab,kb->nka", rotation_matrix(angles), corners).abs().amax(dim=(0, 1))
        disp = self.max_displacement * (quantile_sigmas if self.distribution == "normal" else 1.0)
        need = rotated + torch.tensor(self.translation, dtype=torch.float64) + disp - half
        return tuple(max(0, math.ceil(float(v) - 1e-9)) for v in need)

    def randomize(self, batch_size: int) -> AugmentParams:
        """Draw parameters for ``batch_size`` samples from the own generator (on CPU; same numbers on any device)."""
        g = self.generator
        apply = torch.rand(batch_size, generator=g) < self.prob
        lim = torch.tensor(self.rotation_degrees) * (math.pi / 180)
        angles = (torch.rand(batch_size, 3, generator=g) * 2 - 1) * lim
        trans = (torch.rand(batch_size, 3, generator=g) * 2 - 1) * torch.tensor(self.translation)
        shape = (batch_size, 3, *self.control_shape)
        if self.distribution == "uniform":
            control = (torch.rand(shape, generator=g) * 2 - 1) * self.max_displacement
        else:
            control = torch.randn(shape, generator=g) * self.max_displacement
        if not self.enabled:
            apply = torch.zeros_like(apply)
        return AugmentParams(rotation_matrix(angles), trans, control if self.max_displacement > 0 else None, apply)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.enabled:
            return self._crop(image, label)
        return self.apply(image, label, self.randomize(image.shape[0]))

    def _crop(self, image, label):
        img, lab = centre_crop(image, label, self.patch_size, self.output_size)
        return img.float().contiguous(), None if lab is None else lab.contiguous()

    def apply(
        self, image: torch.Tensor, label: torch.Tensor | None, params: AugmentParams
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Resample boxes with given parameters; samples with ``params.apply`` False are centre-cropped exactly."""
        self._check_boxes(image, label)
        apply = params.apply.to(torch.bool).cpu()
        if not bool(apply.any()):
            return self._crop(image, label)
        if bool(apply.all()):
            return self._resample(image, label, params)
        img, lab = self._crop(image, label)
        img, lab = img.clone(), None if lab is None else lab.clone()
        idx = torch.nonzero(apply).flatten()
        sub = replace(
            params,
            rotation=params.rotation[idx],
            translation=params.translation[idx],
            control=None if params.control is None else params.control[idx],
            apply=params.apply[idx],
        )
        idx = idx.to(image.device)
        aug_img, aug_lab = self._resample(image[idx], None if label is None else label[idx], sub)
        img[idx] = aug_img
        if lab is not None:
            lab[idx] = aug_lab
        return img, lab

    def _check_boxes(self, image, label):
        if image.ndim != 5:
            raise ValueError(f"image must be (B, C, X, Y, Z), got shape {tuple(image.shape)}")
        if label is not None and (label.ndim != 5 or label.shape[0] != image.shape[0] or label.shape[1] != 1):
            raise ValueError(
                f"label must be (B, 1, X, Y, Z) matching image {tuple(image.shape)}, got {tuple(label.shape)}"
            )
        centre_crop(image[:1, :1], None if label is None else label[:1], self.patch_size, self.output_size)

    def _device_tensors(self, device: torch.device) -> list[torch.Tensor]:
        """Knot positions (voxels from the patch centre) and spline bases per axis, cached per device."""
        key = (device.type, device.index)
        if key not in self._device_cache:
            self._device_cache[key] = [k.to(device) for k in self._knots] + [w.to(device) for w in self._basis]
        return self._device_cache[key]

    def _base_grid(self, box_size: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The identity grid (*patch_size, 3), normalised for ``box_size``; cached (one per box size and device)."""
        key = (device.type, device.index, *box_size)
        if key not in self._base_cache:
            axes = [
                (torch.arange(p, dtype=torch.float64) - (p - 1) / 2) * (2.0 / max(s - 1, 1))
                for p, s in zip(self.patch_size, box_size, strict=True)
            ]
            base = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)  # (z, y, x) order
            if len(self._base_cache) > 4:
                self._base_cache.clear()
            self._base_cache[key] = base.float().to(device)
        return self._base_cache[key]

    def sampling_grid(self, params: AugmentParams, box_size: Sequence[int], device=None) -> torch.Tensor:
        """Normalised ``grid_sample`` grid (B, *patch_size, 3), last axis in (z, y, x) order, align_corners=True.

        The spline reproduces linear functions exactly, so ``(R - I) x + t`` is folded into the control coefficients
        (its values at the knots) and the dense grid costs three small matrix products, one large one and one add
        of the cached identity grid.
        """
        device = torch.device(device) if device is not None else params.rotation.device
        box_size = tuple(int(s) for s in box_size)
        kx, ky, kz, wx, wy, wz = self._device_tensors(device)
        box = torch.tensor([float(s) for s in box_size], device=device)
        scale = 2.0 / (box - 1).clamp(min=1)  # voxel offset -> normalised offset, per axis (x, y, z)
        perm = [2, 1, 0]  # grid_sample wants (z, y, x): the last tensor axis first
        eye = torch.eye(3, device=device)
        rot = params.rotation.to(device=device, dtype=torch.float32) - eye
        rot = (scale[:, None] * rot)[:, perm]  # (B, 3 out in z/y/x order, 3 in x/y/z order)
        shift = (scale * params.translation.to(device=device, dtype=torch.float32))[:, perm]
        b = rot.shape[0]
        coef = (
            shift.view(b, 3, 1, 1, 1)
            + rot[:, :, 0].reshape(b, 3, 1, 1, 1) * kx.view(1, 1, -1, 1, 1)
            + rot[:, :, 1].reshape(b, 3, 1, 1, 1) * ky.view(1, 1, 1, -1, 1)
            + rot[:, :, 2].reshape(b, 3, 1, 1, 1) * kz.view(1, 1, 1, 1, -1)
        )
        if params.control is not None:
            coef = coef + (params.control.to(device=device, dtype=torch.float32) * scale.view(1, 3, 1, 1, 1))[:, perm]
        # float64 on CUDA: immune to TF32 matmuls (torch.set_float32_matmul_precision), and cheap there
        dt = torch.float64 if device.type == "cuda" else torch.float32
        coef, wx, wy, wz = coef.to(dt), wx.to(dt), wy.to(dt), wz.to(dt)
        field = wy @ (coef @ wz.T)  # (B, 3, nx, Py, Pz)
        field = field.permute(0, 2, 3, 4, 1).reshape(b, wx.shape[1], -1)  # (B, nx, Py * Pz * 3)
        grid = (wx @ field).view(b, *self.patch_size, 3).float()
        return grid.add_(self._base_grid(box_size, device))

    def _resample(self, image, label, params):
        grid = self.sampling_grid(params, image.shape[2:], image.device)
        img = image.float()
        pad = self.image_pad_value
        # grid_sample pads with zeros: shift by the pad value so that outside samples get exactly the pad value
        img = img - pad if pad != 0 else img
        out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out = out + pad if pad != 0 else out
        if label is None:
            return out, None
        m, o = self.margin, self.output_size
        grid_l = grid[:, m[0] : m[0] + o[0], m[1] : m[1] + o[1], m[2] : m[2] + o[2]]
        # only the window of the box that the label points can reach is converted to float and sampled
        box = tuple(int(s) for s in label.shape[2:])
        window = self._label_window(params, box)
        lab = label[(..., *(slice(lo, hi + 1) for lo, hi in window))].float() - self.label_pad_value
        k = [(s - 1) / (hi - lo) for s, (lo, hi) in zip(box, window, strict=True)]
        b = [k_ - 1 - 2 * lo / (hi - lo) for k_, (lo, hi) in zip(k, window, strict=True)]
        k = torch.tensor(k[::-1], device=grid.device, dtype=grid.dtype)  # grid channels are (z, y, x)
        b = torch.tensor(b[::-1], device=grid.device, dtype=grid.dtype)
        lab = F.grid_sample(lab, grid_l * k + b, mode="nearest", padding_mode="zeros", align_corners=True)
        return out, (lab + self.label_pad_value).round().long()

    def _label_window(self, params: AugmentParams, box: tuple[int, ...]) -> list[tuple[int, int]]:
        """Inclusive index range per axis of the box that the label's sampling points can reach (from the parameters).

        The points are ``c + t + R x + e(x)`` for ``x`` in the output region: the affine part is extreme at the
        region's corners and ``|e|`` is bounded by the largest coefficient. One voxel of slack on each side.
        """
        half = torch.tensor([(o - 1) / 2 for o in self.output_size], dtype=torch.float64)
        corners = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * 3) * half
        rot = params.rotation.detach().to("cpu", torch.float64)
        pos = torch.einsum("bij,kj->bki", rot, corners) + params.translation.detach().to("cpu", torch.float64)[:, None]
        lo_off, hi_off = pos.amin(dim=(0, 1)), pos.amax(dim=(0, 1))
        if params.control is not None:
            d = params.control.detach().to("cpu", torch.float64).abs().amax(dim=(0, 2, 3, 4))
            lo_off, hi_off = lo_off - d, hi_off + d
        window = []
        for s, l_, h_ in zip(box, lo_off.tolist(), hi_off.tolist(), strict=True):
            c = (s - 1) / 2
            lo, hi = max(0, math.floor(c + l_) - 1), min(s - 1, math.ceil(c + h_) + 1)
            if hi - lo < 1:  # all points outside the box along this axis (or a single voxel): keep the whole axis
                lo, hi = 0, s - 1
            window.append((lo, hi))
        return window


class CascadeBatchPreparer(PrepareBatch):
    """``prepare_batch`` for MONAI's ``SupervisedTrainer``: boxes to the device, augment there, crop to the network.

    The batch holds boxes from :class:`custom.sampling.RandCandidateCropd` (image (B, C, *S), label (B, 1, *S)).
    Returns ``(inputs (B, C, *patch_size) float32, targets (B, 1, *output_size) long MetaTensor)``; without
    ``augment`` the boxes are centre-cropped exactly (validation). If the batch has ``weights_key`` ("class_weights",
    (B, K)), it rides along as ``targets.meta["class_weights"]`` on the device, where the loss reads it.

    >>> prep = CascadeBatchPreparer(None, patch_size=(100, 100, 92))
    >>> x, y = prep({"image": torch.rand(2, 1, 104, 104, 96), "label": torch.zeros(2, 1, 104, 104, 96)}, "cpu")
    >>> tuple(x.shape), tuple(y.shape), y.dtype
    ((2, 1, 100, 100, 92), (2, 1, 12, 12, 4), torch.int64)
    """

    def __init__(
        self,
        augment: RandElasticRigid3D | None = None,
        image_key: str = "image",
        label_key: str = "label",
        patch_size: Sequence[int] = (132, 132, 116),
        output_size: Sequence[int] | None = None,
        channels_last: bool = False,
        weights_key: str = "class_weights",
    ):
        self.patch_size, self.output_size, _ = _check_sizes(patch_size, output_size)
        if augment is not None and (augment.patch_size, augment.output_size) != (self.patch_size, self.output_size):
            raise ValueError(
                f"augment sizes {augment.patch_size} -> {augment.output_size} differ from "
                f"{self.patch_size} -> {self.output_size}"
            )
        self.augment = augment
        self.image_key, self.label_key, self.weights_key = image_key, label_key, weights_key
        self.channels_last = bool(channels_last)

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        if not isinstance(batchdata, dict):
            raise TypeError(f"CascadeBatchPreparer expects a dict batch, got {type(batchdata).__name__}")
        for k in (self.image_key, self.label_key):
            if k not in batchdata:
                raise KeyError(f"batch has no {k!r} (keys: {list(batchdata)})")

        def to_device(x):
            x = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
            return x.to(device=device, non_blocking=non_blocking, **kwargs)

        image, label = to_device(batchdata[self.image_key]), to_device(batchdata[self.label_key])
        if self.augment is not None:
            inputs, targets = self.augment(image, label)
        else:
            inputs, targets = centre_crop(image, label, self.patch_size, self.output_size)
            inputs = inputs.float().contiguous()
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
        targets = MetaTensor(targets.long().contiguous())
        if self.weights_key in batchdata:
            weights = to_device(batchdata[self.weights_key]).float()
            if weights.ndim == 1:
                weights = weights.unsqueeze(0).expand(inputs.shape[0], -1)
            targets.meta["class_weights"] = weights
        return inputs, targets
