"""The ``varied`` preset (tools/phantom/variety.py, tools/phantom/pelvis.py): fields of view, contrast, texture and
shape variety drawn from their own generator, pelvic organs that carry no label, the other presets untouched."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from tools.phantom import PRESETS, generate_phantom
from tools.phantom.anatomy import Anatomy
from tools.phantom.generate import anatomy_span
from tools.phantom.params import sample_params
from tools.phantom.render import Canvas, render
from tools.phantom.tissues import T
from tools.phantom.variety import BOTTOM_MODES, TOP_MODES, sample_variety

COARSE = {"matrix": 48, "spacing": 8.0, "slice_spacing": 6.0, "noise_std": 0.0}  # fast, whole body in plane


def _drawn(seed: int):
    rng = np.random.default_rng(seed)
    drawn = sample_params(rng, PRESETS["varied"])
    g, acq = drawn["anatomy"], drawn["acquisition"]
    return g, acq, sample_variety(seed, g, acq)


@cache
def _draws(n: int = 80):
    return [_drawn(s) for s in range(n)]


@cache
def _phantom(seed: int, **kw):
    return generate_phantom(seed, labels="paper", preset="varied", **{**COARSE, **kw})


def _seed_with(pred, n: int = 80) -> int:
    for s, (g, acq, v) in enumerate(_draws(n)):
        if pred(g, acq, v):
            return s
    raise AssertionError("no seed in range has the property")


def test_every_field_of_view_mode_is_drawn_at_about_its_probability():
    draws = _draws()
    tops = [v["fov"]["top"] for _, _, v in draws]
    bottoms = [v["fov"]["bottom"] for _, _, v in draws]
    for mode in TOP_MODES:
        assert tops.count(mode) >= 4, (mode, tops.count(mode))
    for mode, p in BOTTOM_MODES.items():
        assert abs(bottoms.count(mode) / len(draws) - p) < 0.15, (mode, bottoms.count(mode))
    # a slab always starts inside the liver
    assert all(t == "inside_liver" for t, b in zip(tops, bottoms, strict=True) if b == "slab")


def test_portal_venous_spleen_is_brighter_or_darker_than_the_liver():
    """The demo preset's fixed order (spleen always 10-20 HU brighter) is broken on purpose, both ways."""
    diffs = [v["contrast"]["spleen_minus_liver"] for g, acq, v in _draws() if acq["phase"] == "portal_venous"]
    assert len(diffs) >= 25
    assert sum(d < -5 for d in diffs) >= 0.2 * len(diffs)
    assert sum(d > 5 for d in diffs) >= 0.2 * len(diffs)
    native_pancreas = [g["hu_all"]["pancreas"]["native"] for g, acq, v in _draws() if acq["phase"] == "native"]
    assert min(native_pancreas) < 30  # fatty pancreas as in the native real CT (-6 HU)


def test_the_rendered_image_follows_the_drawn_contrast():
    s = _seed_with(lambda g, a, v: a["phase"] == "portal_venous" and v["contrast"]["spleen_minus_liver"] < -12)
    p = _phantom(s)
    med = {k: float(np.median(p.image[p.label == p.labels[k]])) for k in ("liver", "spleen")}
    assert med["spleen"] < med["liver"] - 5, med
    assert p.params["variety"]["contrast"]["spleen_minus_liver"] < -12


def test_inside_liver_top_and_short_slab():
    s = _seed_with(lambda g, a, v: v["fov"] == {"top": "inside_liver", "bottom": "below_kidneys"})
    p = _phantom(s)
    top = p.label[:, :, -1] if p.affine[2, 2] > 0 else p.label[:, :, 0]  # the most superior slice
    assert (top == p.labels["liver"]).sum() > 20  # the scan starts inside the liver
    s = _seed_with(lambda g, a, v: v["fov"]["bottom"] == "slab")
    p = _phantom(s)
    assert p.params["z_extent_mm"] <= 120 + 2 * 6.0
    assert (p.label == p.labels["liver"]).any()


def _render(seed: int, pelvic: bool):
    from tools.phantom.acquisition import resolve_grid

    g, acq, _ = _drawn(seed)
    g["pelvic_organs"] = pelvic
    an = Anatomy(seed, g)
    xs, ys, zs, spacing = resolve_grid(acq, g["a"], PRESETS["varied"], COARSE, g, anatomy_span(an))
    cv = Canvas(xs, ys, zs)
    render(an, cv)
    return g, cv, float(np.prod(spacing)) / 1000.0


def test_pelvic_organs_are_painted_below_the_crest_and_carry_no_label():
    s = _seed_with(lambda g, a, v: v["fov"]["bottom"] == "pelvis" and g["bladder_ml"] > 200)
    g, with_pelvis, ml = _render(s, True)
    _, without, _ = _render(s, False)
    low = with_pelvis.zs < g["z_crest"] - 60.0
    urine = (with_pelvis.tissue[:, :, low] == T["urine"]).sum() * ml
    urine_before = (without.tissue[:, :, low] == T["urine"]).sum() * ml
    assert urine_before == 0 and urine > 0.4 * g["bladder_ml"], (urine, g["bladder_ml"])
    bone = np.isin(with_pelvis.tissue[:, :, low], [T["cortical_bone"], T["cancellous_bone"]]).sum()
    bone_before = np.isin(without.tissue[:, :, low], [T["cortical_bone"], T["cancellous_bone"]]).sum()
    assert bone > bone_before  # femoral heads and symphysis
    # no labelled structure gained or lost a voxel
    from custom.labels import STRUCTURES

    labelled = lambda o: np.where((o >= 1) & (o <= len(STRUCTURES)), o, 0)  # noqa: E731
    np.testing.assert_array_equal(labelled(with_pelvis.owner), labelled(without.owner))


def test_varied_phantoms_are_reproducible_and_other_presets_carry_no_variety():
    s = _seed_with(lambda g, a, v: v["fov"]["bottom"] == "pelvis")
    a = _phantom(s)
    b = generate_phantom(s, labels="paper", preset="varied", **COARSE)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.params == b.params and a.params["variety"]["fov"]["bottom"] == "pelvis"
    assert "variety" not in generate_phantom(s, preset="tiny").params


@pytest.mark.parametrize("key", ["noise_std"])
def test_overrides_win_over_the_variety(key):
    p = _phantom(3, **{key: 4.5})
    assert p.params[key] == 4.5
