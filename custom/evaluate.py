"""The paper's evaluation report from the per-case CSVs written by the inference workflow in evaluation mode
(``custom.case_handlers.CaseMetrics``).

- Per-organ Dice for stage 1, stage 2 (non-overlapping) and stage 2 (overlapping): mean, std, median, min, max
  (Tables 1-2 of the paper), absent organs excluded (nanmean) and counted.
- Wilcoxon signed-rank p-values, stage 2 vs stage 1, per organ (paired by case).
- C2 recall and false-positive rate against the dilation radius r per organ (Fig. 6) as CSV and a PNG plot.

``python -m custom.evaluate report --output_dir eval`` (also run by ``evaluate.json``'s ``finalize``).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from custom.metrics import summarize
from custom.outputs import atomic_write, atomic_write_text

STAGE_TITLES = {"stage1": "Stage 1", "stage2_nol": "Stage 2: non-overlapping", "stage2": "Stage 2"}


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def dice_tables(rows: list[dict], organs: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``{stage: {organ or "mean": summary}}``; "mean" summarises each case's nanmean over organs."""
    by_stage: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_stage[r["stage"]].append(r)
    out = {}
    for stage, rs in by_stage.items():
        table = {o: summarize([_f(r.get(o)) for r in rs]) for o in organs}
        per_case = []
        for r in rs:
            v = np.array([_f(r.get(o)) for o in organs])
            per_case.append(float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"))
        table["mean"] = summarize(per_case)
        out[stage] = table
    return out


def wilcoxon_vs_stage1(rows: list[dict], organs: list[str], stage: str = "stage2") -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank p-value of ``stage`` vs stage 1 per organ, paired by case (NaN if < 2 pairs)."""
    s1 = {r["case_id"]: r for r in rows if r["stage"] == "stage1"}
    s2 = {r["case_id"]: r for r in rows if r["stage"] == stage}
    out = {}
    for o in organs + ["mean"]:
        a, b = [], []
        for cid in sorted(set(s1) & set(s2)):
            if o == "mean":
                x = np.nanmean([_f(s1[cid].get(k)) for k in organs])
                y = np.nanmean([_f(s2[cid].get(k)) for k in organs])
            else:
                x, y = _f(s1[cid].get(o)), _f(s2[cid].get(o))
            if np.isfinite(x) and np.isfinite(y):
                a.append(x)
                b.append(y)
        diff = np.subtract(b, a)
        if len(a) < 2 or np.allclose(diff, 0):
            out[o] = float("nan")
        else:
            out[o] = float(wilcoxon(b, a).pvalue)
    return out


def markdown_tables(tables: Mapping, pvalues: Mapping[str, Mapping[str, float]], organs: list[str]) -> str:
    cols = organs + ["mean"]
    lines = []
    for stage in [s for s in ("stage1", "stage2_nol", "stage2") if s in tables] + [
        s for s in tables if s not in STAGE_TITLES
    ]:
        lines += [f"**{STAGE_TITLES.get(stage, stage)}** (Dice %)", "", "| Dice | " + " | ".join(cols) + " |"]
        lines.append("|---" * (len(cols) + 1) + "|")
        for stat in ("mean", "std", "median", "min", "max"):
            vals = [tables[stage][c][stat] for c in cols]
            lines.append(f"| {stat} | " + " | ".join("n/a" if math.isnan(v) else f"{100 * v:.1f}" for v in vals) + " |")
        lines.append("| cases | " + " | ".join(str(tables[stage][c]["n"]) for c in cols) + " |")
        lines.append("")
    for stage, p in pvalues.items():
        lines += [f"**Wilcoxon signed-rank p, {STAGE_TITLES.get(stage, stage)} vs stage 1**", ""]
        lines += ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines.append("| p | " + " | ".join("n/a" if math.isnan(p[c]) else f"{p[c]:.3g}" for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def c2_curve(rows: list[dict]) -> list[dict]:
    """Mean recall / FPR / C2 fraction per (organ, r) over cases."""
    acc: dict[tuple[str, int], list[list[float]]] = defaultdict(lambda: [[], [], []])
    for r in rows:
        a = acc[(r["organ"], int(r["r"]))]
        a[0].append(_f(r["recall"]))
        a[1].append(_f(r["fpr"]))
        a[2].append(_f(r["c2_fraction"]))
    return [
        {"organ": o, "r": rr, "recall": float(np.nanmean(v[0])), "fpr": float(np.nanmean(v[1])),
         "c2_fraction": float(np.nanmean(v[2])), "cases": len(v[0])}
        for (o, rr), v in sorted(acc.items())
    ]  # fmt: skip


def plot_c2_curve(curve: list[dict], path: Path) -> Path:
    """Recall (solid) and FPR (dashed) against r, one colour per organ, drawn with Pillow."""
    from PIL import Image, ImageDraw

    w, h, m = 760, 420, 50
    img = Image.new("RGB", (w, h), "white")
    dr = ImageDraw.Draw(img)
    radii = sorted({c["r"] for c in curve})
    organs = list(dict.fromkeys(c["organ"] for c in curve))
    rmax = max(radii) or 1
    pw = w - 2 * m - 150

    def xy(r, v):
        return m + pw * r / rmax, h - m - (h - 2 * m) * v

    dr.rectangle([m, m, m + pw, h - m], outline="black")
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        dr.line([xy(0, v), xy(rmax, v)], fill=(225, 225, 225))
        dr.text((m - 35, xy(0, v)[1] - 6), f"{v:.2f}", fill="black")
    for r in radii:
        dr.text((xy(r, 0)[0] - 3, h - m + 6), str(r), fill="black")
    dr.text((m + pw / 2 - 60, h - 22), "dilation radius r (voxels)", fill="black")
    dr.text((m, 12), "C2 recall (solid) and false-positive rate (dashed) vs r", fill="black")
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
               (240, 50, 230), (128, 128, 0), (0, 0, 0)]  # fmt: skip
    for i, organ in enumerate(organs):
        col = palette[i % len(palette)]
        pts = sorted((c["r"], c["recall"], c["fpr"]) for c in curve if c["organ"] == organ)
        rec = [xy(r, v) for r, v, _ in pts if np.isfinite(v)]
        fpr = [xy(r, v) for r, _, v in pts if np.isfinite(v)]
        if len(rec) > 1:
            dr.line(rec, fill=col, width=2)
        for a, b in zip(fpr[:-1], fpr[1:], strict=False):  # dashed: draw every other half segment
            dr.line([a, ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)], fill=col, width=2)
        dr.text((m + pw + 15, m + 16 * i), organ, fill=col)
    with atomic_write(path, suffix=Path(path).suffix) as tmp:
        img.save(tmp)
    return path


def write_report(output_dir: str, labels: Mapping[str, int] | None = None) -> Path:
    """Reads ``metrics.csv`` and ``c2_recall_fpr.csv`` in ``output_dir``; writes ``report.md``, ``dice_summary.csv``,
    ``c2_curve.csv`` and ``c2_curve.png``. Returns the report path."""
    out = Path(output_dir)
    rows = _read_csv(out / "metrics.csv")
    organs = [k for k, _ in sorted(labels.items(), key=lambda kv: kv[1])] if labels else [
        k for k in rows[0] if k not in ("case_id", "stage")
    ]  # fmt: skip
    tables = dice_tables(rows, organs)
    stages2 = [s for s in ("stage2_nol", "stage2") if s in tables]
    pvalues = {s: wilcoxon_vs_stage1(rows, organs, s) for s in stages2 if "stage1" in tables}
    md = ["# Evaluation", "", markdown_tables(tables, pvalues, organs)]
    summary_rows = [{"stage": s, "organ": o, **dict(t)} for s, tab in tables.items() for o, t in tab.items()]
    _write(out / "dice_summary.csv", summary_rows)
    if (out / "c2_recall_fpr.csv").is_file():
        curve = c2_curve(_read_csv(out / "c2_recall_fpr.csv"))
        _write(out / "c2_curve.csv", curve)
        plot_c2_curve(curve, out / "c2_curve.png")
        md += ["**C2 against the dilation radius r** (mean over cases; FPR = |C2 \\ organ| / |C1 \\ organ|)", ""]
        md += ["| organ | r | recall | FPR | C2 fraction of the image |", "|---|---|---|---|---|"]
        md += [
            f"| {c['organ']} | {c['r']} | {100 * c['recall']:.1f} | {100 * c['fpr']:.1f} "
            f"| {100 * c['c2_fraction']:.1f} |"
            for c in curve
            if c["organ"] == "all" or c["r"] == 3
        ]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(md) + "\n")
    print("\n".join(md))
    return report


def _write(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


if __name__ == "__main__":
    import fire

    fire.Fire({"report": write_report})
