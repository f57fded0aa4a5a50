"""Glue between the bundle configs and MONAI's engines: data lists per split, batch preparation for evaluators, and
training patches that do not depend on the number of data-loader workers.

The training batch preparation (patch augmentation on the training device) lives in :mod:`custom.augment`; this
module holds the evaluation side, where whole volumes go through the tiled inferer restricted to the candidate region.

Why :class:`SeededSampler` + :class:`SeededDataset`: MONAI's ``DataLoader`` seeds the random transforms once per
worker (``seed + worker_id``), so which patch a case yields depends on which worker loads it: a run with 2 workers
draws other patches (and other losses) than the same run with 0 workers. Here the sampler, which always runs in the
main process, draws one seed per item together with the shuffled order, and the dataset re-seeds its random transforms
with it before each item: the patches depend only on ``seed``, whatever ``num_workers`` is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from pathlib import Path

import torch
from monai.data.utils import set_rnd
from monai.engines.utils import PrepareBatchExtraInput
from monai.utils import MAX_SEED, CommonKeys

from custom.data import load_datalist, split_folds, train_val_split


def datalist(
    dataset_json: str,
    split: str = "train",
    val_fraction: float = 0.2,
    seed: int = 0,
    candidates_dir: str | None = None,
    candidate_key: str = "c2",
    max_cases: int | None = None,
    fold: int | None = None,
    n_folds: int = 5,
) -> list[dict]:
    """Cases of one split of an MSD dataset.json, paired by case id.

    ``split``: ``"train"`` / ``"val"`` (a deterministic split of the ``training`` list), ``"all"`` (the whole
    ``training`` list) or ``"test"``. With ``candidates_dir`` (stage 2), each case gets ``candidate_key`` pointing to
    ``<candidates_dir>/<case_id>_c2.nii.gz`` written by the stage-1 prediction step; a missing file is an error.

    ``fold`` (0 .. ``n_folds`` - 1) replaces the hold-out split by k-fold cross-validation
    (:func:`custom.data.split_folds`): ``"val"`` is fold ``fold``, ``"train"`` every other fold. Training one stage-1
    model per fold gives each case a model that never saw it, for out-of-fold C2
    (:class:`custom.out_of_fold.OutOfFoldRunner`).

    Example::

        datalist("data/dataset.json", split="val", fold=2, n_folds=5)  # the cases of fold 2
    """
    if split == "test":
        cases = load_datalist(dataset_json, key="test")
    else:
        cases = load_datalist(dataset_json, key="training")
        if split in ("train", "val") and fold is not None:
            if not 0 <= int(fold) < int(n_folds):
                raise ValueError(f"fold must be in 0..{int(n_folds) - 1} for n_folds={n_folds}, got {fold}")
            train, val = split_folds(cases, n_folds=int(n_folds), seed=seed)[int(fold)]
            cases = train if split == "train" else val
        elif split in ("train", "val"):
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


class CandidatePrepareBatch(PrepareBatchExtraInput):
    """MONAI's ``PrepareBatchExtraInput(extra_keys={"mask": candidate_key})`` where the candidate key may be absent.

    Image and label go to the device (MONAI's ``default_prepare_batch``: a label that is not a tensor, e.g. a path
    that was not loaded, gives no target) and the candidate mask becomes the inferer's ``mask`` keyword, so the tiled
    inferer skips tiles outside the candidate region and writes background there. A batch without ``candidate_key``
    (or ``candidate_key=None``) is inferred everywhere. ``train.json``'s validator, whose batches always hold the
    candidate region, uses MONAI's class directly; this is the base of :class:`custom.evaluator.CascadePrepareBatch`.
    """

    label_key = CommonKeys.LABEL

    def __init__(self, candidate_key: str | None = "c1"):
        super().__init__(extra_keys={} if candidate_key is None else {"mask": candidate_key})
        self.candidate_key = candidate_key

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        if self.candidate_key is not None and self.candidate_key not in batchdata:
            return PrepareBatchExtraInput(extra_keys={})(batchdata, device, non_blocking, **kwargs)
        return super().__call__(batchdata, device, non_blocking, **kwargs)


def inference_datalist(path: str, split: str = "test", series_uid: str | None = None) -> list[dict]:
    """Cases to segment: a NIfTI file, a folder of NIfTI files, a DICOM series folder, a list or a quoted glob
    pattern of these, or an MSD ``dataset.json`` (then the ``split`` list, ``test`` by default, with its labels for
    evaluation). Each dict has ``image`` and ``case_id`` (and ``label`` from a dataset.json); ``series_uid`` chooses
    the series of a DICOM folder that holds several (``--datalist#series_uid <UID>`` on the bundle command line)."""
    from custom.io import list_inputs

    if isinstance(path, (str, Path)) and str(path).endswith(".json"):
        if split == "test":
            return load_datalist(path, key="test")
        return datalist(path, split=split)
    cases = list_inputs(path, series_uid=series_uid)
    return [{"image": str(c.path), "case_id": c.case_id, **({"series_uid": c.series_uid} if c.series_uid else {})}
            for c in cases]  # fmt: skip


class SeededSampler(torch.utils.data.Sampler):
    """Shuffled (or ordered) indices of ``data_source``, each yielded as ``(index, seed)`` for :class:`SeededDataset`.

    Both the order and the per-item seeds come from one ``torch.Generator`` seeded with ``seed`` and advanced from
    pass to pass in the main process, so they are the same for any number of workers.

    >>> list(SeededSampler(range(3), shuffle=False, seed=0))[0][0]
    0
    """

    def __init__(self, data_source: Sized | int, shuffle: bool = True, seed: int = 0):
        self.n = int(data_source) if isinstance(data_source, int) else len(data_source)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = 0
        self.generator = torch.Generator().manual_seed(self.seed)

    def set_epoch(self, epoch: int) -> None:
        """Re-seed from ``(seed, epoch)``: a run resumed at epoch e draws the same patches as an uninterrupted run."""
        self.epoch = int(epoch)
        self.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, MAX_SEED, (self.n,), generator=self.generator, dtype=torch.int64)
        return iter([(int(i), int(s)) for i, s in zip(order.tolist(), seeds.tolist(), strict=True)])


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a MONAI dataset: an ``(index, seed)`` key re-seeds the random transforms before the item is made.

    Plain integer keys (e.g. from a ``DistributedSampler``) give the wrapped dataset's item unchanged.

    Example (config)::

        "dataloader": {"_target_": "DataLoader", "dataset": {"_target_": "custom.workflow.SeededDataset",
                       "dataset": "@train#dataset"}, "sampler": {"_target_": "custom.workflow.SeededSampler",
                       "data_source": "@train#dataset", "seed": "@seed"}, "shuffle": false}
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)) and len(key) == 2:
            index, seed = int(key[0]), int(key[1])
            set_rnd(getattr(self.dataset, "transform", None) or self.dataset, seed)
            return self.dataset[index]
        return self.dataset[key]


class SamplerEpochSetter:
    """Ignite handler: ``sampler.set_epoch(epoch)`` at the start of every epoch (MONAI does this only for
    ``DistributedSampler``), so the order and patch seeds depend on the epoch, not on how often the process iterated:
    a resumed run continues with the uninterrupted run's data."""

    def __init__(self, sampler):
        self.sampler = sampler

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.sampler.set_epoch(e.state.epoch))
