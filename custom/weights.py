"""Weights that can be trusted: safe loading with ``weights_only=True``, checksum lists, weights into a network.

Loading is always ``torch.load(..., weights_only=True)``: a file carrying a pickled object that would run code is
refused before anything executes (:class:`UnsafeCheckpointError`), a missing file is an error naming the path (never a
silent run on random weights), and an expected SHA-256 is checked before loading. ``"auto"`` takes it from the
``checksums.json`` beside the file (the bundle ships one for its weights in ``models/``) and skips the check with a
warning where there is none or where it does not list the file, so that a user's own weights load without a listing
while shipped weights that were changed or truncated are refused; pass the hex digest itself to insist on a check.

- :func:`load_checkpoint`: a whole checkpoint dict (what :class:`custom.checkpoint.ResumeFromCheckpoint` restores).
- :func:`load_weights`, :func:`load_network` (the configs' loader): a network's state dict, checked against it.
- :func:`sha256_file`, :func:`write_checksums`, :func:`verify_checksums`: the ``checksums.json`` of a weights folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from custom.outputs import atomic_write_text

__all__ = [
    "CHECKSUMS_FILE",
    "WEIGHT_KEYS",
    "WEIGHT_PATTERNS",
    "UnsafeCheckpointError",
    "load_checkpoint",
    "load_network",
    "load_weights",
    "sha256_file",
    "verify_checksums",
    "write_checksums",
]

#: Keys under which a checkpoint dict may hold the network's state dict, tried in this order.
WEIGHT_KEYS: tuple[str, ...] = ("network", "model", "state_dict")
#: Key of the small metadata record written beside the state dicts.
#: File name of the checksum list written by :func:`write_checksums`.
CHECKSUMS_FILE = "checksums.json"
#: Weight files listed by :func:`write_checksums` by default.
WEIGHT_PATTERNS: tuple[str, ...] = ("*.pt", "*.pth", "*.ts", "*.onnx", "*.safetensors")

_module_logger = logging.getLogger(__name__)


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects other than tensors and plain containers; it was not unpickled."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", expected_sha256: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    ``expected_sha256`` is checked before unpickling (``"auto"``: the hash listed for this file in the
    ``checksums.json`` beside it; without a listing, or when the listing does not name the file, the file is loaded
    unverified with a warning). Raises ``FileNotFoundError`` (missing), ``ValueError`` (hash mismatch, unreadable
    file) or :class:`UnsafeCheckpointError` (pickled objects that ``weights_only`` refuses; nothing was executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path} (refusing to continue with untrained weights).")
    if expected_sha256:
        _check_sha256(path, expected_sha256)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it contains pickled objects other than tensors and plain containers, which "
            f"could run code when unpickled. Re-save only state dicts (torch.save(model.state_dict(), ...)). "
            f"Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"Cannot read checkpoint {path} (truncated or not a torch file?): {e}") from e


def _expected_from_checksums(path: Path) -> str | None:
    """The SHA-256 listed for ``path`` in the ``checksums.json`` beside it, or None (logged) when not listed."""
    listing = path.parent / CHECKSUMS_FILE
    if not listing.is_file():
        _module_logger.warning(f"{path}: not verified (no {CHECKSUMS_FILE} beside it; sha256 'auto').")
        return None
    try:
        files = json.loads(listing.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{listing} is not a checksum list written by write_checksums ({e!r}).") from e
    if path.name not in files:
        _module_logger.warning(f"{path}: not verified ({listing} does not list it; listed: {sorted(files)}).")
        return None
    return files[path.name]["sha256"]


def _check_sha256(path: Path, expected: str) -> None:
    source = "expected"
    if expected == "auto":
        expected = _expected_from_checksums(path)
        if expected is None:
            return
        source = f"listed in {path.parent / CHECKSUMS_FILE}"
    actual = sha256_file(path)
    if actual.lower() != expected.strip().lower():
        raise ValueError(
            f"SHA-256 mismatch for {path}: {source} {expected.strip().lower()}, got {actual}. The file is truncated, "
            "corrupt or was replaced; to load weights of your own, pass sha256 null (or their digest) or give "
            "another path."
        )


def _extract_state_dict(ckpt: Any, key: str | None, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict or a checkpoint dict.")
    if key is not None:
        if key not in ckpt:
            raise KeyError(f"{path} has no key {key!r}; its top-level keys are {sorted(map(str, ckpt))}.")
        sd = ckpt[key]
    elif ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        sd = ckpt
    else:
        found = [k for k in WEIGHT_KEYS if isinstance(ckpt.get(k), Mapping)]
        if not found:
            raise KeyError(
                f"{path} is neither a raw state dict nor a checkpoint with one of the keys {list(WEIGHT_KEYS)}; "
                f"its top-level keys are {sorted(map(str, ckpt))}."
            )
        sd = ckpt[found[0]]
    if not isinstance(sd, Mapping) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: the selected entry is not a state dict of tensors.")
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DistributedDataParallel/DataParallel wrapper
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_into(
    network: torch.nn.Module, sd: dict[str, torch.Tensor], strict: bool, skip_mismatched: bool, path: Path
) -> dict[str, torch.Tensor]:
    """Check the whole match first and only then copy, so a refused file leaves the network untouched."""
    own = network.state_dict()
    mismatched = {
        k: (tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape
    }
    if mismatched and not skip_mismatched:
        detail = ", ".join(f"{k}: file {a} vs network {b}" for k, (a, b) in list(mismatched.items())[:5])
        raise RuntimeError(
            f"{path}: {len(mismatched)} tensor(s) differ in shape from the network ({detail}). "
            "For fine-tuning to another label set pass skip_mismatched=True to keep those at their initialisation."
        )
    sd = {k: v for k, v in sd.items() if k not in mismatched}
    missing = sorted(set(own) - set(sd) - set(mismatched))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"{path}: weights do not match the network: missing {missing[:10]}, unexpected {unexpected[:10]} "
            "(strict=True)."
        )
    network.load_state_dict(sd, strict=False)
    if mismatched:
        _module_logger.warning(
            f"{path}: kept {len(mismatched)} tensor(s) at their initialisation because their shapes differ "
            f"(fine-tuning): {sorted(mismatched)}"
        )
    if missing or unexpected:
        _module_logger.warning(f"{path}: loaded non-strictly; missing {missing}, unexpected {unexpected}.")
    return sd


def load_weights(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    expected_sha256: str | None = None,
    strict: bool = True,
    network: torch.nn.Module | None = None,
    key: str | None = None,
    skip_mismatched: bool = False,
) -> dict[str, torch.Tensor]:
    """Load network weights safely and return the state dict (loaded into ``network`` when given).

    Accepts a raw state dict or a checkpoint dict with a ``network`` / ``model`` / ``state_dict`` entry (``key``
    picks another entry); a ``module.`` prefix from a DDP wrapper is removed. With ``network``, the match is checked
    before anything is copied: shape differences are an error unless ``skip_mismatched=True`` (fine-tuning to another
    label set: those tensors, typically the head, keep their initialisation and are logged), missing or unexpected
    names are an error when ``strict``.

    Example::

        load_weights("models/model.pt", expected_sha256="auto", network=net)  # hash from models/checksums.json
    """
    path = Path(path)
    sd = _extract_state_dict(load_checkpoint(path, map_location, expected_sha256), key, path)
    if network is not None:
        sd = _load_into(network, sd, strict, skip_mismatched, path)
        _module_logger.info(f"Loaded {len(sd)} tensors from {path} into {type(network).__name__}.")
    return sd


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks.

    Example::

        sha256_file("models/model.pt")  # 'e3b0c442...'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def _weight_files(folder: Path, patterns: Iterable[str]) -> list[Path]:
    found = {p for pat in patterns for p in folder.rglob(pat) if p.is_file() and not p.name.startswith(".")}
    return sorted(found)


def write_checksums(
    folder: str | os.PathLike, patterns: Sequence[str] = WEIGHT_PATTERNS, filename: str = CHECKSUMS_FILE
) -> dict[str, str]:
    """Write ``<folder>/checksums.json`` listing the SHA-256 and size of every weight file below ``folder``.

    Example::

        write_checksums("models")  # {"model.pt": "9f2c...", "stage1/model.pt": "04ab..."}
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No such folder: {folder}")
    files = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in _weight_files(folder, patterns)
    }
    if not files:
        raise FileNotFoundError(f"No weight files matching {list(patterns)} below {folder}.")
    text = json.dumps({"algorithm": "sha256", "files": files}, indent=2, sort_keys=True) + "\n"
    atomic_write_text(folder / filename, text)
    return {k: v["sha256"] for k, v in files.items()}


def verify_checksums(
    folder: str | os.PathLike, filename: str = CHECKSUMS_FILE, patterns: Sequence[str] = WEIGHT_PATTERNS
) -> dict[str, str]:
    """Check every file listed in ``<folder>/checksums.json``; raise ``ValueError`` naming each missing or changed one.

    Weight files present but not listed are reported in the log, not an error. Returns the verified hashes.

    Example::

        verify_checksums("models")  # raises: "models/model.pt: expected 9f2c..., got 11aa..."
    """
    folder = Path(folder)
    listing = folder / filename
    if not listing.is_file():
        raise FileNotFoundError(f"No checksum list at {listing} (write it with write_checksums).")
    files = json.loads(listing.read_text())["files"]
    problems, verified = [], {}
    for rel, entry in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            problems.append(f"{path}: expected {entry['sha256']}, got {actual}")
        else:
            verified[rel] = actual
    if problems:
        raise ValueError(f"Checksum verification failed for {len(problems)} file(s): " + "; ".join(problems))
    unlisted = [p.relative_to(folder).as_posix() for p in _weight_files(folder, patterns)]
    unlisted = [r for r in unlisted if r not in files]
    if unlisted:
        _module_logger.warning(f"Weight files not listed in {listing}: {unlisted}")
    return verified


def load_network(
    network: torch.nn.Module,
    path: str | os.PathLike,
    device: Any = "cpu",
    sha256: str | None = None,
    strict: bool = True,
    skip_mismatched: bool = False,
    eval_mode: bool = True,
) -> torch.nn.Module:
    """Load weights into ``network`` (read on the CPU, safely) and return it on ``device``, for configs.

    A missing file is an error naming it: inference never runs on random weights.

    Example (config)::

        {"_target_": "custom.weights.load_network", "network": "@network_def", "path": "@stage1_weights",
         "device": "@device"}
    """
    load_weights(
        path,
        map_location="cpu",
        expected_sha256=sha256,
        strict=strict,
        network=network,
        skip_mismatched=skip_mismatched,
    )
    network = network.to(device)
    return network.eval() if eval_mode else network
