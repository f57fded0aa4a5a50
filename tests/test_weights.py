"""Safe weight loading (``weights_only=True``, layouts, fine-tuning) and checksum lists: custom.weights (tiny nets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from parameterized import parameterized
from test_checkpoint import assert_states_equal, tiny_net

from custom.checkpoint import ResumeFromCheckpoint
from custom.weights import (
    UnsafeCheckpointError,
    load_weights,
    sha256_file,
    verify_checksums,
    write_checksums,
)

# ---------------------------------------------------------------------------------------------------------------------
# safe loading


def wrap(sd, how):
    return {"raw": sd, "network": {"network": sd, "optimizer": {}}, "model": {"model": sd, "epoch": 3}}.get(
        how, {how: sd}
    )


@parameterized.expand([("raw",), ("network",), ("model",), ("state_dict",)])
def test_load_weights_accepts_layouts(how):
    import tempfile

    src, dst = tiny_net(), tiny_net()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "w.pt"
        torch.save(wrap(src.state_dict(), how), path)
        sd = load_weights(path, network=dst)
    assert set(sd) == set(src.state_dict())
    assert_states_equal(dst.state_dict(), src.state_dict())


def test_load_weights_strips_ddp_prefix_and_picks_key(tmp_path):
    src, dst = tiny_net(), tiny_net()
    torch.save({"ema": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pt")
    load_weights(tmp_path / "w.pt", network=dst, key="ema")
    assert_states_equal(dst.state_dict(), src.state_dict())


class Payload:
    """Unpickling this object creates a file: a stand-in for a checkpoint that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"network": tiny_net().state_dict(), "extra": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        load_weights(path, network=tiny_net())
    with pytest.raises(UnsafeCheckpointError):
        ResumeFromCheckpoint(str(path), {"network": tiny_net()}, engine_key=None)(Engine(lambda e, b: None))
    assert not marker.exists()
    # the payload is real: an unsafe load does run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pt")):
        load_weights(tmp_path / "nope.pt", network=tiny_net())


def test_sha256_checks(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_net().state_dict(), path)
    good = sha256_file(path)
    assert len(good) == 64
    load_weights(path, expected_sha256=good.upper())
    wrong = "0" * 64
    with pytest.raises(ValueError, match=rf"w\.pt.*{wrong}.*{good}"):
        load_weights(path, expected_sha256=wrong)
    load_weights(path, expected_sha256="auto")  # no checksums.json beside it: loaded unverified, with a warning
    write_checksums(tmp_path)
    load_weights(path, expected_sha256="auto")
    torch.save(tiny_net(3).state_dict(), path)  # replaced after the listing
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        load_weights(path, expected_sha256="auto")


def test_fine_tuning_skips_mismatched_head(tmp_path):
    src, dst = tiny_net(2), tiny_net(3)
    torch.save({"network": src.state_dict()}, tmp_path / "w.pt")
    head_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("2.")}
    with pytest.raises(RuntimeError, match="skip_mismatched"):
        load_weights(tmp_path / "w.pt", network=dst)
    assert_states_equal({k: v for k, v in dst.state_dict().items() if k.startswith("2.")}, head_before)
    assert not torch.equal(dst[0].weight, src[0].weight)  # a refused load copies nothing
    sd = load_weights(tmp_path / "w.pt", network=dst, skip_mismatched=True)
    assert set(sd) == {"0.weight", "0.bias"}
    assert torch.equal(dst[0].weight, src[0].weight)
    assert_states_equal({k: v for k, v in dst.state_dict().items() if k.startswith("2.")}, head_before)


def test_strict_missing_keys(tmp_path):
    sd = tiny_net().state_dict()
    del sd["2.bias"]
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(RuntimeError, match=r"missing \['2.bias'\]"):
        load_weights(tmp_path / "w.pt", network=tiny_net())
    load_weights(tmp_path / "w.pt", network=tiny_net(), strict=False)


@parameterized.expand(
    [
        ("unknown_keys", {"weights": {"a": torch.ones(1)}, "epoch": 1}, KeyError, "top-level keys"),
        ("not_a_dict", [torch.ones(1)], ValueError, "list"),
        ("not_tensors", {"network": {"a": 1}}, ValueError, "not a state dict"),
    ]
)
def test_unusable_checkpoint_layouts(_, obj, exc, message):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        torch.save(obj, Path(d) / "w.pt")
        with pytest.raises(exc, match=message):
            load_weights(Path(d) / "w.pt")


def test_truncated_file(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_net().state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="Cannot read checkpoint"):
        load_weights(path)


# ---------------------------------------------------------------------------------------------------------------------
# checksums


def test_write_and_verify_checksums(tmp_path):
    torch.save(tiny_net().state_dict(), tmp_path / "model.pt")
    (tmp_path / "stage1").mkdir()
    torch.save(tiny_net().state_dict(), tmp_path / "stage1" / "model.pt")
    (tmp_path / "notes.txt").write_text("not weights")
    hashes = write_checksums(tmp_path)
    assert sorted(hashes) == ["model.pt", "stage1/model.pt"]
    listing = json.loads((tmp_path / "checksums.json").read_text())
    assert listing["files"]["model.pt"]["bytes"] == (tmp_path / "model.pt").stat().st_size
    assert verify_checksums(tmp_path) == hashes

    data = bytearray((tmp_path / "stage1" / "model.pt").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "stage1" / "model.pt").write_bytes(bytes(data))
    (tmp_path / "model.pt").unlink()
    with pytest.raises(ValueError, match="2 file") as err:
        verify_checksums(tmp_path)
    assert "model.pt: missing" in str(err.value) and f"expected {hashes['stage1/model.pt']}" in str(err.value)


def test_checksum_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No weight files"):
        write_checksums(tmp_path)
    with pytest.raises(FileNotFoundError, match="write_checksums"):
        verify_checksums(tmp_path)
