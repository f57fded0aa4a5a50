"""Out-of-fold candidate regions: each training case's C2 from the stage-1 model that did not train on it.

:class:`OutOfFoldRunner` runs the inference evaluator (:class:`custom.evaluator.CascadeEvaluator`) fold by fold, each
fold's cases with that fold's stage-1 weights (``candidates.json --out_of_fold true``), for training stage 2.
"""

from __future__ import annotations

import logging
from pathlib import Path

from custom.evaluator import CascadeEvaluator, rank_suffix
from custom.outputs import atomic_write_json

logger = logging.getLogger(__name__)


class OutOfFoldRunner:
    """Candidate regions out of fold: each case's C2 comes from the stage-1 model whose validation fold held it.

    Why: stage 2 learns to segment inside C2 as stage 1 makes it on CTs it has never seen. A stage-1 model that
    trained on a case segments it better than it will segment an unseen CT, so C2 made by it is tighter and misses
    less than at test time, and stage 2 learns from regions nicer than those it will get. With one stage-1 model per
    fold (``train.json`` with ``fold=k``: trained on every fold but k, validated on fold k), every training case gets a
    C2 from a model that never trained on it.

    The folds are :func:`custom.workflow.datalist` with ``split="val"`` and ``fold=k`` on ``dataset_json``, the very
    call the training made, so they agree with it as long as ``n_folds`` and ``seed`` do. Fold ``k``'s weights
    (``fold_weights.format(fold=k)``) are loaded into the evaluator's stage-1 network (``inferer.stage1_network``)
    and the evaluator runs over that fold's cases; outputs, failures and metrics rows accumulate in it as in one run,
    and ``summary.json`` records which fold and weights file produced each case. Every weights file and every case's
    fold are checked, and existing outputs refused, before anything is computed. With ``fold_weights=None`` it is the
    evaluator's own run.

    Example (``candidates.json``, ``--out_of_fold true``)::

        {"_target_": "custom.out_of_fold.OutOfFoldRunner", "runner": "@evaluator",
         "dataset_json": "@data_list_file_path", "fold_weights": "runs/stage1_fold{fold}/checkpoints/model_final.pt",
         "n_folds": 5, "seed": "@seed", "output_dir": "@output_dir"}
    """

    def __init__(
        self,
        runner: CascadeEvaluator,
        fold_weights: str | None = None,
        dataset_json: str | None = None,
        n_folds: int = 5,
        seed: int = 0,
        sha256: str | None = None,
        output_dir: str | None = None,
    ):
        self.runner = runner
        self.output_dir = Path(str(output_dir)) if output_dir is not None else None
        self.fold_weights = fold_weights
        self.dataset_json = dataset_json
        self.n_folds = int(n_folds)
        self.seed = int(seed)
        self.sha256 = sha256
        if fold_weights is not None:
            if "{fold}" not in str(fold_weights):
                raise ValueError(f"fold_weights must contain '{{fold}}' (one file per fold), got {fold_weights!r}")
            if dataset_json is None:
                raise ValueError("out-of-fold candidates need dataset_json: the dataset the folds were trained on")
        self.summary: dict = {}

    def plan(self) -> list[tuple[int, Path, list[dict]]]:
        """``[(fold, weights, cases), ...]`` over the runner's cases; raises before any work if a file or a fold is
        missing."""
        from custom.workflow import datalist

        fold_of: dict[str, int] = {}
        for k in range(self.n_folds):
            for case in datalist(self.dataset_json, split="val", fold=k, n_folds=self.n_folds, seed=self.seed):
                fold_of[str(case["case_id"])] = k
        orphans = [str(c["case_id"]) for c in self.runner.data if str(c["case_id"]) not in fold_of]
        if orphans:
            raise ValueError(
                f"{len(orphans)} case(s) are in no fold of {self.dataset_json} (n_folds={self.n_folds}, "
                f"seed={self.seed}): {', '.join(orphans[:5])}; out-of-fold candidates are for its training cases"
            )
        weights = [Path(str(self.fold_weights).format(fold=k)) for k in range(self.n_folds)]
        missing = [str(w) for w in weights if not w.is_file()]
        if missing:
            raise FileNotFoundError(
                f"stage-1 weights missing for {len(missing)} of {self.n_folds} folds (train them with train.json "
                f"--fold k --n_folds {self.n_folds}): {', '.join(missing)}"
            )
        return [
            (k, weights[k], [c for c in self.runner.data if fold_of[str(c["case_id"])] == k])
            for k in range(self.n_folds)
        ]

    def run(self) -> dict:
        if self.fold_weights is None:
            self.runner.run()
            return {}
        from custom.weights import load_weights

        plan = self.plan()
        self.runner.check_existing()  # every fold's outputs, before the first fold computes anything
        network = self.runner.inferer.stage1_network
        all_cases = self.runner.data
        folds: dict[str, dict] = {}
        try:
            for k, path, cases in plan:
                folds[str(k)] = {"weights": str(path), "cases": [str(c["case_id"]) for c in cases]}
                if not cases:
                    continue
                load_weights(path, map_location="cpu", expected_sha256=self.sha256, network=network)
                network.eval()
                logger.info("fold %d: %d case(s) with stage-1 weights %s", k, len(cases), path)
                self.runner.data = cases
                self.runner.run(check=False)
        finally:
            self.runner.data = all_cases
        seconds = dict(self.runner.case_seconds)
        self.summary = {
            "cases": len(all_cases),
            "succeeded": len(seconds),
            "failed": self.runner.failures,
            "seconds": seconds,
            "n_folds": self.n_folds,
            "seed": self.seed,
            "folds": folds,
            "case_fold": {cid: int(k) for k, f in folds.items() for cid in f["cases"]},
        }
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.output_dir / f"summary{rank_suffix()}.json", self.summary)
        return self.summary

    def exit_if_failed(self) -> None:
        """For the config's ``finalize``: exits non-zero after listing the failed cases of all folds."""
        self.runner.exit_if_failed()
