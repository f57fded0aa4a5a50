"""The organ table of ``tools.phantom.organs``: its rows are consistent, its order is the dependency order, and the
organs it builds keep the distances it declares."""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
import pytest

from custom.labels import STRUCTURES
from tools.phantom.acquisition import PRESETS
from tools.phantom.anatomy import Anatomy
from tools.phantom.organs import ORGANS, VESSEL_GROUPS, build_organs
from tools.phantom.params import TARGET_ML, sample_params
from tools.phantom.render import ORGAN_PAINTERS


@cache
def _anatomy(seed: int = 0) -> Anatomy:
    return Anatomy(seed, sample_params(np.random.default_rng(seed), PRESETS["tiny"])["anatomy"])


def test_every_row_is_consistent():
    names = [s.name for s in ORGANS]
    assert names == ["kidney_right", "kidney_left", "pancreas", "stomach", "gallbladder", "spleen", "liver"]
    assert set(names) <= set(STRUCTURES)
    drawn = _anatomy().g["targets_ml"]
    assert sorted(s.key for s in ORGANS) == sorted(drawn)  # one drawn target per row, no other
    assert {s.key.split("_")[0] for s in ORGANS} == set(TARGET_ML)
    for i, spec in enumerate(ORGANS):
        above = set(names[:i])
        assert all(other in above or other in VESSEL_GROUPS for other, _ in spec.excl), spec.name
        assert set(spec.clips) <= {"cavity", "below", "back"} and spec.paint in ORGAN_PAINTERS
        assert spec.field_box[0] in ("centre", "bounds") and spec.field[0] > 0 and spec.field[1] > 0


def test_a_row_may_exclude_only_rows_above_it():
    liver_first = (ORGANS[-1], *ORGANS[:-1])
    with pytest.raises(ValueError, match=r"liver excludes 'kidney_right', which is neither a vessel group nor"):
        build_organs(_anatomy(), liver_first)
    bad_box = (dataclasses.replace(ORGANS[0], field_box=("around", 70.0)),)
    with pytest.raises(ValueError, match=r"kidney_right: field_box must be"):
        build_organs(_anatomy(), bad_box)


def test_calibration_of_a_row_does_not_depend_on_rows_below():
    full = _anatomy().organs
    kidneys_only = build_organs(_anatomy(), ORGANS[:2])
    assert set(kidneys_only) == {"kidney_right", "kidney_left"}
    for name, org in kidneys_only.items():
        assert org.s == full[name].s and 0.6 <= org.s <= 1.4


def test_built_organs_keep_the_declared_distances():
    """Where an organ's shape is, an organ excluding it by margin m is at least m away (signed distances)."""
    organs = _anatomy().organs
    checked = 0
    for spec in ORGANS:
        org = organs[spec.name]
        for other, margin in spec.excl:
            if other in VESSEL_GROUPS:
                continue
            lo, hi = organs[other].box()
            axes = [np.arange(a, b, 3.0, dtype=np.float32) for a, b in zip(lo, hi, strict=True)]
            inside_other = organs[other].shape_sdf(*axes) < 0
            assert inside_other.any(), other
            d = org.sdf(*axes)[inside_other]
            assert float(d.min()) >= margin - 1e-3, (spec.name, other)
            checked += 1
    assert checked == 9  # stomach 1, gallbladder 1, spleen 3, liver 4


def test_calibrated_volume_is_near_the_target():
    """Each organ's calibrated volume (own clips and exclusions, 2 mm lattice) is within 6 % of its drawn target."""
    an = _anatomy()
    for spec in ORGANS:
        org = an.organs[spec.name]
        lo, hi = org.box()
        axes = [np.arange(a, b, 2.0, dtype=np.float32) for a, b in zip(lo, hi, strict=True)]
        ml = float((org.sdf(*axes) < 0).sum()) * 8.0 / 1000.0
        target = an.g["targets_ml"][spec.key]
        assert abs(ml / target - 1.0) < 0.06, (spec.name, ml, target)
