"""custom.precision: ``amp="auto"`` / ``channels_last="auto"`` decisions (through ValidTiledInferer), forced values.

The capability check and the probe are stubbed where the decision logic is tested: nothing here depends on the CPU
this runs on, its ISA or its speed. Where the real probe runs, the clock is a fake one advanced by the network.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import custom.precision as precision_mod
from custom.inferer import Precision, ValidTiledInferer
from custom.network import ValidUNet3D
from tests.test_network import randomize_bn

CPU = torch.device("cpu")
FP32_CL, FP32_NC, BF16_CL = (torch.float32, True), (torch.float32, False), (torch.bfloat16, True)


def make_net(seed: int = 0, features: int = 4) -> ValidUNet3D:
    torch.manual_seed(seed)
    return randomize_bn(ValidUNet3D(out_channels=3, features=features), seed).eval()


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(precision_mod, "PRECISION_CACHE", {})


def stub(monkeypatch, native: bool, times: dict | None = None) -> list:
    """Stub the capability (``native``) and the probe (returns ``times`` for the configurations asked); returns the
    list of probe calls (the configurations of each)."""
    calls: list = []
    monkeypatch.setattr(precision_mod.runtime, "cpu_bf16_supported", lambda: native)

    def probe(self, network, device, configs):
        calls.append(list(configs))
        if times is None:
            raise AssertionError("the probe must not run here")
        return {c: times[c] for c in configs}

    monkeypatch.setattr(ValidTiledInferer, "_probe", probe)
    return calls


@pytest.mark.usefixtures("fresh_cache")
class TestAutoDecision:
    def test_no_native_bf16_means_float32_without_a_probe(self, monkeypatch):
        calls = stub(monkeypatch, native=False)  # the stubbed probe raises if called
        prec = ValidTiledInferer().resolve_precision(make_net(), CPU)
        assert (prec.dtype, prec.channels_last, prec.source) == (torch.float32, True, "capability")
        assert "no native bfloat16" in prec.reason and calls == []

    def test_no_native_bf16_and_layout_forced_needs_no_probe(self, monkeypatch):
        stub(monkeypatch, native=False)
        prec = ValidTiledInferer(channels_last=False).resolve_precision(make_net(), CPU)
        assert (prec.dtype, prec.channels_last, prec.source) == (torch.float32, False, "capability")

    def test_native_bf16_chosen_when_clearly_faster(self, monkeypatch):
        calls = stub(monkeypatch, native=True, times={FP32_CL: 0.20, BF16_CL: 0.05})
        inf = ValidTiledInferer()
        prec = inf.resolve_precision(make_net(), CPU)
        assert (prec.dtype, prec.channels_last, prec.source) == (torch.bfloat16, True, "probe")
        assert calls == [[FP32_CL, BF16_CL]]  # the precision only: channels-last unless forced
        assert prec.probe_seconds == {"float32, channels_last_3d": 0.2, "bfloat16, channels_last_3d": 0.05}

    @pytest.mark.parametrize(
        "times, layout",
        [
            ({FP32_CL: 0.20, BF16_CL: 0.19}, "auto"),  # bf16 only 5 % faster: float32 (exact) wins
            ({FP32_CL: 0.30, BF16_CL: 6.0}, "auto"),  # bf16 the slow-kernel trap
            ({FP32_NC: 0.30, (torch.bfloat16, False): 0.29}, False),  # NCDHW forced: both dtypes in NCDHW
        ],
    )
    def test_float32_kept_unless_bf16_wins_by_the_margin(self, monkeypatch, times, layout):
        stub(monkeypatch, native=True, times=times)
        prec = ValidTiledInferer(channels_last=layout).resolve_precision(make_net(), CPU)
        assert (prec.dtype, prec.channels_last) == (torch.float32, layout != False)  # noqa: E712

    @pytest.mark.parametrize(
        "amp, cl, dtype",
        [(True, True, torch.bfloat16), (False, False, torch.float32), ("true", "1", torch.bfloat16),
         ("False", "no", torch.float32)],
    )  # fmt: skip
    def test_forced_values_bypass_capability_and_probe(self, monkeypatch, amp, cl, dtype):
        stub(monkeypatch, native=False)  # the stubbed probe raises if called
        inf = ValidTiledInferer(amp=amp, channels_last=cl)
        prec = inf.resolve_precision(make_net(), CPU)
        assert (prec.dtype, prec.channels_last, prec.source) == (dtype, cl in (True, "1"), "forced")

    def test_forced_bf16_on_a_cpu_without_native_bf16_is_honoured(self, monkeypatch):
        stub(monkeypatch, native=False)
        prec = ValidTiledInferer(amp=True).resolve_precision(make_net(), CPU)  # the layout stays channels-last
        assert (prec.dtype, prec.channels_last, prec.source) == (torch.bfloat16, True, "forced")

    @pytest.mark.parametrize("name, value", [("amp", "maybe"), ("channels_last", 2), ("progress", "sometimes")])
    def test_bad_values_are_refused_by_name(self, name, value):
        with pytest.raises(ValueError, match=f"--{name} must be true or false"):
            ValidTiledInferer(**{name: value})

    def test_auto_spellings(self):
        inf = ValidTiledInferer(amp="AUTO", channels_last=" auto ", progress="Auto")
        assert (inf.amp, inf.channels_last, inf.progress) == ("auto", "auto", "auto")

    def test_decision_cached_per_network_shape_and_logged_once(self, monkeypatch, caplog):
        calls = stub(monkeypatch, native=True, times={FP32_CL: 0.2, BF16_CL: 0.05})
        with caplog.at_level(logging.INFO, logger="custom.precision"):
            a = ValidTiledInferer(name="stage 1").resolve_precision(make_net(0), CPU)
            b = ValidTiledInferer(name="stage 2").resolve_precision(make_net(1), CPU)  # same shapes, other weights
            c = ValidTiledInferer().resolve_precision(make_net(0, features=2), CPU)  # other widths: probed again
        assert a is b and len(calls) == 2 and c.dtype == torch.bfloat16
        decided = [r.getMessage() for r in caplog.records if "bfloat16, channels_last_3d on cpu" in r.getMessage()]
        assert len(decided) == 2 and decided[0].startswith("stage 1: ")

    def test_cuda_uses_the_device_capability(self, monkeypatch):
        stub(monkeypatch, native=False)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stub GPU")
        for ok, dtype in ((True, torch.bfloat16), (False, torch.float32)):
            monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda ok=ok: ok)
            prec = precision_mod.decide_precision(torch.device("cuda"), "auto", "auto", probe_fn=None)
            assert (prec.dtype, prec.channels_last, prec.source) == (dtype, True, "capability")

    def test_failing_probe_falls_back_to_float32(self, monkeypatch, caplog):
        monkeypatch.setattr(precision_mod.runtime, "cpu_bf16_supported", lambda: True)

        def broken(self, network, device, configs):
            raise RuntimeError("no kernel")

        monkeypatch.setattr(ValidTiledInferer, "_probe", broken)
        with caplog.at_level(logging.WARNING, logger="custom.precision"):
            prec = ValidTiledInferer().resolve_precision(make_net(), CPU)
        assert prec.dtype == torch.float32 and "probe failed" in prec.reason
        assert any("precision probe failed" in r.getMessage() for r in caplog.records)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class CostlyNet(nn.Module):
    """A stand-in valid network (output 88 voxels smaller) that advances a fake clock: 20x slower under bfloat16
    autocast (the slow-kernel trap), NCDHW 1.5x slower than channels-last."""

    def __init__(self, clock: FakeClock, bf16_cost: float = 2.0):
        super().__init__()
        self.bf16_cost = bf16_cost
        self.conv = nn.Conv3d(2, 2, 1)  # two input channels: the layouts differ (with one they coincide)
        self.clock = clock
        self.calls: list = []

    def forward(self, x):
        bf16 = torch.is_autocast_enabled("cpu")
        cl = x.stride(1) == 1  # channels innermost
        self.clock.t += (self.bf16_cost if bf16 else 0.1) * (1.0 if cl else 1.5)
        self.calls.append((bf16, cl))
        return self.conv(x[:, :, 44:-44, 44:-44, 44:-44].float())


@pytest.mark.usefixtures("fresh_cache")
def test_real_probe_drops_the_slow_bf16_path(monkeypatch):
    """The probe itself (not stubbed) on a network whose timings come from a fake clock: the 20x bfloat16 trap is
    dropped after its warm-up even where the capability check claims native support."""
    clock = FakeClock()
    monkeypatch.setattr(precision_mod.time, "perf_counter", clock)
    monkeypatch.setattr(precision_mod.runtime, "cpu_bf16_supported", lambda: True)
    net = CostlyNet(clock)
    inf = ValidTiledInferer(tile_size=(12, 12, 12), activation="none")
    prec = inf.resolve_precision(net, CPU)
    assert (prec.dtype, prec.channels_last, prec.source) == (torch.float32, True, "probe")
    assert prec.probe_seconds == {"float32, channels_last_3d": 0.1, "bfloat16, channels_last_3d": 2.0}
    assert inf.probe_input_size() == (100, 100, 100)
    assert net.calls == [(True, True), (False, True)]  # the trap's warm-up decided it: no timed runs


@pytest.mark.usefixtures("fresh_cache")
def test_real_probe_times_again_when_close(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(precision_mod.time, "perf_counter", clock)
    monkeypatch.setattr(precision_mod.runtime, "cpu_bf16_supported", lambda: True)
    net = CostlyNet(clock, bf16_cost=0.095)  # 5 % faster: within the margin, float32 is kept
    prec = ValidTiledInferer(channels_last=False, activation="none").resolve_precision(net, CPU)
    assert (prec.dtype, prec.channels_last) == (torch.float32, False)
    assert len(net.calls) == 6 and set(net.calls) == {(True, False), (False, False)}  # warm-up + 2 rounds each


@pytest.mark.usefixtures("fresh_cache")
def test_real_probe_stops_early_when_bf16_wins_clearly(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(precision_mod.time, "perf_counter", clock)
    monkeypatch.setattr(precision_mod.runtime, "cpu_bf16_supported", lambda: True)
    net = CostlyNet(clock, bf16_cost=0.02)
    prec = ValidTiledInferer(activation="none").resolve_precision(net, CPU)
    assert (prec.dtype, prec.channels_last) == (torch.bfloat16, True)
    assert prec.probe_seconds == {"float32, channels_last_3d": 0.1, "bfloat16, channels_last_3d": 0.02}
    assert net.calls == [(True, True), (False, True)]  # two warm-ups decided it


@pytest.mark.usefixtures("fresh_cache")
@pytest.mark.parametrize("native, source", [(False, "capability"), (True, "probe")])
def test_auto_is_exact_when_it_chooses_float32(monkeypatch, native, source):
    stub(monkeypatch, native=native, times={FP32_CL: 0.1, BF16_CL: 0.3})  # the probe (if asked) prefers float32
    net = make_net(3)
    x = torch.randn(1, 1, 20, 13, 9, generator=torch.Generator().manual_seed(4))
    auto = ValidTiledInferer(tile_size=(12, 12, 12))
    got = auto(x, net).as_tensor()
    ref = ValidTiledInferer(tile_size=(12, 12, 12), amp=False, channels_last=False, fold_bn=False)(x, net).as_tensor()
    assert auto.last_stats["dtype"] == "float32" and auto.last_stats["precision"]["amp"] == "auto"
    assert auto.last_stats["precision"]["source"] == source and auto.last_stats["precision"]["fold_bn"] is True
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(1), ref.argmax(1))


@pytest.mark.usefixtures("fresh_cache")
def test_stats_carry_the_decision(monkeypatch):
    stub(monkeypatch, native=True, times={FP32_CL: 0.2, BF16_CL: 0.05})
    inf = ValidTiledInferer(tile_size=(12, 12, 12))
    inf(torch.randn(1, 1, 20, 13, 9), make_net())
    st = inf.last_stats
    assert (st["dtype"], st["channels_last"]) == ("bfloat16", True)
    assert st["precision"]["source"] == "probe" and st["precision"]["reason"].startswith("bfloat16 50 ms")
    assert isinstance(Precision(torch.float32, True, "forced", "x").as_dict()["dtype"], str)
