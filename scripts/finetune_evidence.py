"""Fine-tuned against from-scratch training with few labelled cases: the phantom analogue of the paper's Table 5.

The paper pre-trains on seven abdominal structures and fine-tunes, with a 10 times smaller learning rate, on a small
dataset labelled with more structures (its Table 5: kidneys gain most). Here:

1. a small phantom dataset labelled with the "extended" set (the paper's seven + both kidneys + IVC: 11 classes) is
   written (``--n_train`` cases, of which 20 % validate, and ``--n_test`` unseen test cases; seeds unlike the
   pre-training phantoms');
2. two stage-1 runs on it, identical except for the start: ``finetuned`` (``finetune.json``: every pretrained tensor
   whose shape fits is loaded, the head is new, learning rate x ``lr_factor`` 0.1) and ``scratch`` (random start, the
   base learning rate). Both run at the same time, one CPU thread each (``--threads``), so load hits both alike;
3. each trained stage 1 segments the test cases (``inference.json`` + ``evaluate.json`` with ``stage1_only``), and
   the per-organ Dice of both go into ``<workdir>/finetune_vs_scratch.md`` / ``.csv``.

Both runs use the same configs as the rest of the bundle (``common.json``, ``train.json``, ``demo.json``) plus
``--extra`` overrides (by default the evidence recipe: 8 features, Dice + weighted CE). Example (the numbers in
``bundle/docs/finetuning.md``)::

    python scripts/finetune_evidence.py --pretrained runs/evidence_f8/stage1/checkpoints/model_final.pt \
        --workdir runs/finetune_evidence --n_train 5 --n_test 6 --epochs 25
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from custom.evaluate import _read_csv, wilcoxon_vs_stage1  # noqa: E402
from custom.labels import EXTENDED_LABELS  # noqa: E402
from tools.phantom import write_dataset  # noqa: E402

CONFIGS = ROOT / "bundle" / "configs"
ARMS = ("finetuned", "scratch")
#: Overrides in ``--extra`` that the evaluation (an inference workflow) needs too.
INFERENCE_KEYS = ("features", "target_spacing")
DEFAULT_EXTRA = {
    "features": 8,
    "loss#_target_": "custom.loss.CandidateDiceCELoss",
    "loss#weighting": "volume",
}


def _configs(*names: str) -> str:
    return str([str(CONFIGS / n) for n in names])


def _override_args(overrides: dict) -> list[str]:
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", v if isinstance(v, str) else repr(v) if isinstance(v, bool) else json.dumps(v)]
    return args


def train_command(arm: str, dataset_dir: Path, out: Path, pretrained: Path, epochs: int, extra: dict) -> list[str]:
    """The ``monai.bundle run`` command line of one arm."""
    files = ["common.json", "train.json", "demo.json"] + (["finetune.json"] if arm == "finetuned" else [])
    over = {"dataset_dir": str(dataset_dir), "output_dir": str(out), "max_epochs": epochs, "val_interval": 5, **extra}
    if arm == "finetuned":
        over["pretrained_weights"] = str(pretrained)
    else:
        over["labels"] = EXTENDED_LABELS
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", _configs(*files), *_override_args(over)]


def eval_command(dataset_dir: Path, weights: Path, out: Path, extra: dict) -> list[str]:
    """Stage-1 segmentation and per-organ Dice on the test list with the extended labels."""
    # candidates.json's stage-1-only settings (no stage-2 network is loaded), then the evaluation of evaluate.json
    files = ["common.json", "finetune.json", "inference.json", "candidates.json", "evaluate.json", "demo.json"]
    over = {
        "dataset_dir": str(dataset_dir),
        "stage1_weights": str(weights),
        "stage1_only": True,
        "output_dir": str(out),
        **{k: v for k, v in extra.items() if k in INFERENCE_KEYS},
    }
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", _configs(*files), *_override_args(over)]


def _run_parallel(commands: dict[str, list[str]], logs: Path, threads: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    procs, t0, seconds = {}, time.perf_counter(), {}
    for name, cmd in commands.items():
        log = (logs / f"{name}.log").open("w")
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    # each run's own wall time (polled: a run that ends first is not charged for the others)
    while len(seconds) < len(procs):
        for name, (p, log) in procs.items():
            if name in seconds or p.poll() is None:
                continue
            log.close()
            seconds[name] = time.perf_counter() - t0
            if p.returncode != 0:
                for other, _ in procs.values():
                    if other.poll() is None:
                        other.terminate()
                raise RuntimeError(f"{name} failed (exit {p.returncode}); see {logs / (name + '.log')}")
        time.sleep(0.5)
    return seconds


def _stage1_dice(eval_dir: Path) -> dict[str, dict[str, float]]:
    rows = list(csv.DictReader((eval_dir / "dice_summary.csv").open()))
    return {
        r["organ"]: {k: float(v) for k, v in r.items() if k not in ("stage", "organ")}
        for r in rows
        if r["stage"] == "stage1"
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrained", type=Path, required=True, help="stage-1 weights trained on the paper's labels")
    ap.add_argument("--workdir", type=Path, default=Path("runs/finetune_evidence"))
    ap.add_argument("--n_train", type=int, default=5)
    ap.add_argument("--n_test", type=int, default=6)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--preset", default="demo", help="phantom preset of the fine-tuning dataset")
    ap.add_argument("--epochs", type=int, default=25, help="epochs of 10 iterations (demo.json's epoch_length)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per run (both run at once)")
    ap.add_argument("--extra", type=json.loads, default=DEFAULT_EXTRA, help="JSON overrides for both runs")
    args = ap.parse_args(argv)
    if not args.pretrained.is_file():
        ap.error(f"--pretrained {args.pretrained}: no such file")
    work = args.workdir
    data = work / "data"
    if not (data / "dataset.json").is_file():
        write_dataset(
            data, n_train=args.n_train, n_test=args.n_test, seed=args.seed, labels="extended", preset=args.preset
        )
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    train_s = _run_parallel(
        {a: train_command(a, data, work / a, args.pretrained, args.epochs, args.extra) for a in ARMS},
        logs,
        args.threads,
    )
    eval_cmds = {
        f"eval_{a}": eval_command(data, work / a / "checkpoints" / "model_final.pt", work / f"eval_{a}", args.extra)
        for a in ARMS
    }
    _run_parallel(eval_cmds, logs, args.threads)
    dice = {a: _stage1_dice(work / f"eval_{a}") for a in ARMS}
    organs = list(EXTENDED_LABELS)
    # paired by test case: the scratch run plays "stage1" (reference), the fine-tuned run "stage2"
    rows = [
        {**r, "stage": {"finetuned": "stage2", "scratch": "stage1"}[a]}
        for a in ARMS
        for r in _read_csv(work / f"eval_{a}" / "metrics.csv")
        if r["stage"] == "stage1"
    ]
    pvalues = wilcoxon_vs_stage1(rows, organs, "stage2")
    cols = organs + ["mean"]
    lines = [
        f"Stage-1 Dice [%] on {args.n_test} unseen test phantoms (mean over cases); {args.n_train} labelled cases "
        f"({args.epochs} epochs x 10 iterations per run, {args.threads} thread(s) each, run side by side).",
        "",
        "| Dice | " + " | ".join(cols) + " | train time |",
        "|---" * (len(cols) + 2) + "|",
    ]
    table = []
    for a in ARMS:
        means = [100 * dice[a][o]["mean"] for o in cols]
        lines.append(f"| {a} | " + " | ".join(f"{m:.1f}" for m in means) + f" | {train_s[a] / 60:.0f} min |")
        table.append(
            {"run": a, **{o: round(m, 2) for o, m in zip(cols, means, strict=True)}, "train_seconds": round(train_s[a])}
        )
    lines.append("| p (Wilcoxon, paired) | " + " | ".join(f"{pvalues.get(o, float('nan')):.3f}" for o in cols) + " | |")
    (work / "finetune_vs_scratch.md").write_text("\n".join(lines) + "\n")
    with (work / "finetune_vs_scratch.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
