"""Why the phantom-trained demo weights fail on real CT: real example CTs beside phantoms (issue 16, part 2).

Compares, per structure, HU distributions, volumes and positions of the real CTs in ``shared/data/real`` (labels:
TotalSegmentator-derived, scheme ``custom.label_presets.PRESETS["real_ct"]``) with ``tools.phantom`` cases, and
reads the C1 / stage-1 / final outputs of the README inference command on the real cases: which real structure the
voxels of each predicted class belong to. Prints markdown tables and writes a JSON with every number.

    # outputs of the README inference command first, e.g. for case 01:
    python -m monai.bundle run --config_file "['bundle/configs/common.json','bundle/configs/inference.json',\
'bundle/configs/demo.json']" --input ../shared/data/real/01_totalseg_example_ct_abdomen_pelvis/image.nii.gz \
--output_dir runs/real01 --save_outputs "['qc','c1','stage1']"
    python scripts/real_ct_diagnosis.py --real ../shared/data/real --outputs 01=runs/real01 03=runs/real03 \
        --n_phantoms 6 --json runs/real_ct_diagnosis.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.label_presets import PRESETS, label_mapping
from custom.labels import EXTENDED_LABELS, PAPER_LABELS
from custom.metrics import dice_per_class
from tools.phantom import generate_phantom

REAL = PRESETS["real_ct"].labels  # id -> name
#: real structure name -> phantom (extended) label name, where the phantom labels it
TO_PHANTOM = {"aorta": "artery", "portal_vein_and_splenic_vein": "portal_vein", "liver": "liver", "spleen": "spleen",
              "stomach": "stomach", "gallbladder": "gallbladder", "pancreas": "pancreas",
              "kidney_right": "kidney_right", "kidney_left": "kidney_left",
              "inferior_vena_cava": "inferior_vena_cava"}  # fmt: skip
ROWS = [*TO_PHANTOM, "urinary_bladder", "small_bowel", "colon", "duodenum"]


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(path))
    return np.asarray(img.dataobj), img.affine


def _stats(hu: np.ndarray) -> dict:
    if hu.size == 0:
        return {}
    p5, p50, p95 = np.percentile(hu, [5, 50, 95])
    return {"p5": float(p5), "median": float(p50), "p95": float(p95), "std": float(hu.std())}


def _body(hu: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    m = hu > -500
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (1 + int(np.argmax(sizes)))


def _geometry(masks: dict[str, np.ndarray], body: np.ndarray, spacing: np.ndarray) -> dict:
    """Volume (ml) and centroid in mm relative to the body centroid (x: patient right+, y: anterior+) and, along z,
    relative to the top of the liver (negative = below the liver dome)."""
    vox_ml = float(np.prod(spacing)) / 1000.0
    bc = np.array(np.nonzero(body)).mean(1) * spacing
    liver = masks.get("liver")
    z_top = np.nonzero(liver.any((0, 1)))[0].max() * spacing[2] if liver is not None and liver.any() else np.nan
    out = {}
    for name, m in masks.items():
        if not m.any():
            continue
        c = np.array(np.nonzero(m)).mean(1) * spacing
        out[name] = {
            "ml": round(float(m.sum() * vox_ml), 1),
            "dx_mm": round(float(c[0] - bc[0]), 1),
            "dy_mm": round(float(c[1] - bc[1]), 1),
            "z_below_liver_top_mm": round(float(c[2] - z_top), 1),
        }
    return out


def _tissue_fractions(hu: np.ndarray, body: np.ndarray, labelled: np.ndarray) -> dict:
    """Fractions of the body voxels by HU band, for all body voxels and for the unlabelled ones."""
    bands = {"fat (-200..-30)": (-200, -30), "water/soft (-30..70)": (-30, 70), "enhanced (70..200)": (70, 200),
             "bone/contrast (>200)": (200, 1e9), "gas (<-200)": (-1e9, -200)}  # fmt: skip
    out = {}
    for what, sel in (("body", body), ("unlabelled body", body & ~labelled)):
        v = hu[sel]
        out[what] = {b: round(float(((v >= lo) & (v < hi)).mean()), 3) for b, (lo, hi) in bands.items()}
    return out


def real_case(folder: Path) -> dict:
    hu, aff = _canonical(folder / "image.nii.gz")
    lab, _ = _canonical(folder / "label_abdo.nii.gz")
    hu = np.clip(hu.astype(np.float32), -1024, None)
    spacing = np.abs(np.diag(aff)[:3])
    body = _body(hu)
    masks = {REAL[i]: lab == i for i in REAL}
    res = {
        "shape": list(hu.shape),
        "spacing": spacing.round(3).tolist(),
        "z_extent_mm": round(float(hu.shape[2] * spacing[2]), 1),
        "body_fraction": round(float(body.mean()), 3),
        "slices_above_liver_top": int(hu.shape[2] - 1 - np.nonzero(masks["liver"].any((0, 1)))[0].max())
        if masks["liver"].any()
        else None,
        "body_width_mm": round(float(np.ptp(np.nonzero(body.any((1, 2)))[0]) * spacing[0]), 1),
        "body_depth_mm": round(float(np.ptp(np.nonzero(body.any((0, 2)))[0]) * spacing[1]), 1),
        "hu": {n: _stats(hu[m]) for n, m in masks.items() if m.any()},
        "geometry": _geometry(masks, body, spacing),
        "tissues": _tissue_fractions(hu, body, lab > 0),
    }
    return res


def phantom_cases(n: int, preset: str = "demo") -> list[dict]:
    out = []
    for seed in range(n):
        p = generate_phantom(seed, labels="extended", preset=preset, orientation="RAS")
        hu = np.asarray(p.image, np.float32)
        lab = np.asarray(p.label)
        spacing = np.abs(np.diag(p.affine)[:3])
        body = _body(hu)
        masks = {n: lab == i for n, i in EXTENDED_LABELS.items()}
        out.append(
            {
                "seed": seed,
                "phase": p.params.get("phase"),
                "shape": list(hu.shape),
                "z_extent_mm": round(float(hu.shape[2] * spacing[2]), 1),
                "mm_above_liver_top": round(
                    float((hu.shape[2] - 1 - np.nonzero(masks["liver"].any((0, 1)))[0].max()) * spacing[2]), 1
                ),
                "body_fraction": round(float(body.mean()), 3),
                "hu": {n: _stats(hu[m]) for n, m in masks.items() if m.any()},
                "geometry": _geometry(masks, body, spacing),
                "tissues": _tissue_fractions(hu, body, lab > 0),
            }
        )
    return out


def outputs_case(folder: Path, out_dir: Path) -> dict:
    """What the predicted classes of stage 1 and of the cascade are, in terms of the real structures."""
    lab, _ = _canonical(folder / "label_abdo.nii.gz")
    m = label_mapping("real_ct", PAPER_LABELS)
    lut = np.zeros(max(REAL) + 1, np.int64)
    for s, t in m.mapping.items():
        lut[s] = t
    gt7 = lut[lab.astype(np.int64)]
    names = {v: k for k, v in PAPER_LABELS.items()}
    res: dict = {}
    hu, _ = _canonical(folder / "image.nii.gz")
    body = _body(np.clip(hu.astype(np.float32), -1024, None))
    for kind, fname in (("stage1", "image_stage1.nii.gz"), ("final", "image_seg.nii.gz")):
        path = out_dir / fname
        if not path.is_file():
            continue
        pred, _ = _canonical(path)
        pred = pred.astype(np.int64)
        entry = {
            "dice": {
                k: (None if np.isnan(v) else round(100 * v, 1))
                for k, v in dice_per_class(pred, gt7, PAPER_LABELS).items()
            }
        }
        comp = {}
        for k, name in names.items():
            sel = pred == k
            n = int(sel.sum())
            if not n:
                continue
            ids, counts = np.unique(lab[sel].astype(np.int64), return_counts=True)
            order = np.argsort(-counts)[:4]
            comp[name] = {
                "voxels": n,
                "made_of": {
                    ("background" if ids[i] == 0 else REAL[int(ids[i])]): round(float(counts[i] / n), 3) for i in order
                },
            }
        entry["predicted_class_made_of"] = comp
        became = {}
        for sid, sname in REAL.items():
            sel = lab == sid
            n = int(sel.sum())
            if not n or sname not in ROWS:
                continue
            ks, counts = np.unique(pred[sel], return_counts=True)
            order = np.argsort(-counts)[:3]
            became[sname] = {
                "voxels": n,
                "predicted_as": {
                    ("background" if ks[i] == 0 else names[int(ks[i])]): round(float(counts[i] / n), 3) for i in order
                },
            }
        entry["real_structure_predicted_as"] = became
        res[kind] = entry
    c1p = out_dir / "image_c1.nii.gz"
    if c1p.is_file():
        c1, _ = _canonical(c1p)
        c1 = c1 > 0
        res["c1"] = {
            "fraction": round(float(c1.mean()), 3),
            "body_fraction_hu_gt_-500": round(float(body.mean()), 3),
            "organ_voxels_inside": round(float(c1[lab > 0].mean()), 4),
        }
    return res


def _table(rows, cols) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, required=True, help="shared/data/real")
    ap.add_argument("--outputs", nargs="*", default=[], help="CASE=OUTPUT_DIR of the README inference command")
    ap.add_argument("--n_phantoms", type=int, default=6)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    cases = {d.name[:2]: d for d in sorted(a.real.iterdir()) if (d / "label_abdo.nii.gz").is_file()}
    real = {c: real_case(d) for c, d in cases.items() if c in ("01", "03")}
    ph = phantom_cases(a.n_phantoms)
    from tools.phantom.dataset import case_seeds as _case_seeds

    # contrast phases of the demo's training phantoms (tools.demo: write_dataset(n_train=10, seed=0, preset="demo"))
    train_phases = [generate_phantom(s, preset="tiny").params["phase"] for s in _case_seeds(0, 14)[:10]]
    outs = {}
    for spec in a.outputs:
        c, path = spec.split("=", 1)
        outs[c] = outputs_case(cases[c], Path(path))
    result = {"real": real, "phantoms": ph, "outputs": outs, "demo_training_phases": train_phases}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))

    # HU table: median [p5, p95]
    def fmt(s):
        return f"{s['median']:.0f} [{s['p5']:.0f}, {s['p95']:.0f}]" if s else "-"

    rows = []
    for name in ROWS:
        pn = TO_PHANTOM.get(name)
        ph_med = [p["hu"][pn]["median"] for p in ph if pn and pn in p["hu"]]
        ph_w = [p["hu"][pn]["p95"] - p["hu"][pn]["p5"] for p in ph if pn and pn in p["hu"]]
        ph_txt = f"{min(ph_med):.0f}..{max(ph_med):.0f} (p95-p5 {np.median(ph_w):.0f})" if ph_med else "not labelled"
        rows.append([name, *(fmt(real[c]["hu"].get(name, {})) for c in real), ph_txt])
    print("HU per structure: real median [p5, p95]; phantom medians (range over cases)\n")
    print(_table(rows, ["structure", *[f"real {c}" for c in real], f"phantoms (n={len(ph)})"]))
    rows = []
    for name in ROWS:
        pn = TO_PHANTOM.get(name)
        g = [p["geometry"][pn] for p in ph if pn and pn in p["geometry"]]
        pv = f"{min(x['ml'] for x in g):.0f}..{max(x['ml'] for x in g):.0f}" if g else "-"
        pz = (
            f"{min(x['z_below_liver_top_mm'] for x in g):.0f}..{max(x['z_below_liver_top_mm'] for x in g):.0f}"
            if g
            else "-"
        )
        rr = []
        for c in real:
            x = real[c]["geometry"].get(name)
            rr += [f"{x['ml']:.0f}" if x else "-", f"{x['z_below_liver_top_mm']:.0f}" if x else "-"]
        rows.append([name, *rr, pv, pz])
    cols = ["structure"]
    for c in real:
        cols += [f"{c} ml", f"{c} z vs liver top (mm)"]
    print("\nVolumes and height of the centroid relative to the top of the liver\n")
    print(_table(rows, [*cols, "phantom ml", "phantom z (mm)"]))
    print("\nBody tissue fractions\n")
    rows = [[f"real {c}", w, *v.values()] for c in real for w, v in real[c]["tissues"].items()]
    rows += [[f"phantom {p['seed']} ({p['phase']})", w, *v.values()] for p in ph for w, v in p["tissues"].items()]
    print(_table(rows, ["case", "voxels", *next(iter(real.values()))["tissues"]["body"].keys()]))
    fov = "; ".join(f"real {c}: {r['z_extent_mm']} mm, body fraction {r['body_fraction']}" for c, r in real.items())
    print(f"\nFields of view: {fov}; phantoms: " + ", ".join(f"{p['z_extent_mm']:.0f}" for p in ph) + " mm")
    print("Liver dome inside the field of view: " + "; ".join(
        f"real {c}: {r['slices_above_liver_top']} slices above the liver top" for c, r in real.items())
        + "; phantoms: " + ", ".join(f"{p['mm_above_liver_top']:.0f} mm" for p in ph) + " above")  # fmt: skip
    print("Phases of the demo's 10 training phantoms: " + ", ".join(train_phases))
    for c, o in outs.items():
        print(f"\nCase {c}: " + json.dumps(o.get("c1", {})))
        for kind in ("stage1", "final"):
            if kind not in o:
                continue
            print(f"\n{kind} Dice: " + ", ".join(f"{k} {v}" for k, v in o[kind]["dice"].items()))
            rows = [[k, v["voxels"], ", ".join(f"{n} {100 * f:.0f}%" for n, f in v["made_of"].items())]
                    for k, v in o[kind]["predicted_class_made_of"].items()]  # fmt: skip
            print(_table(rows, [f"{kind} predicted class", "voxels", "real structures in it"]))
            rows = [[k, v["voxels"], ", ".join(f"{n} {100 * f:.0f}%" for n, f in v["predicted_as"].items())]
                    for k, v in o[kind]["real_structure_predicted_as"].items()]  # fmt: skip
            print(_table(rows, ["real structure", "voxels", f"{kind} prediction there"]))


if __name__ == "__main__":
    main()
