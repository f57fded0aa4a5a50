"""Where the bundle's outputs go and how they are written: the one atomic-write helper every writer uses.

- :func:`atomic_write` (and :func:`atomic_write_with`, ``_bytes``, ``_text``, ``_json``): a temporary file
  ``.<name>.<12 hex>.tmp*`` in the same folder, moved into place with ``os.replace`` (or a no-clobber hard link);
  a reader never sees a half-written file and an interrupted write keeps the previous one. Segmentations, QC JSON,
  previews, CSVs, checkpoints, the zoo export and the phantom datasets all go through it.
- :func:`remove_stale_temps`: the temporary files a hard-killed run left.
- :func:`safe_case_id`, :func:`path_inside`: output names built from input data stay inside the output folder.
- :func:`check_output_dir`: the output folder exists, is writable and has room, before any case is computed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from custom.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_write",
    "atomic_write_with",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "temp_name",
    "remove_stale_temps",
    "fsync_dir",
    "safe_case_id",
    "path_inside",
    "check_output_dir",
]


def safe_case_id(case_id: Any, where: str | os.PathLike | None = None) -> str:
    """``case_id`` if it is safe to build output file names from, else an :class:`InputError` naming ``where``.

    Case ids name the outputs (``<output_dir>/<case_id>_seg.nii.gz``); one taken from a ``dataset.json`` must not
    lead outside ``output_dir``: no path separator (``/`` or ``\\``), not ``.`` or ``..``, no NUL or control
    character, not empty.

    >>> safe_case_id("case_0001")
    'case_0001'
    >>> safe_case_id("../../etc/cron.d/x", "dataset.json")
    Traceback (most recent call last):
    ...
    custom.errors.InputError: dataset.json: case id '../../etc/cron.d/x' would write outside the output folder ...
    """
    if not isinstance(case_id, str) or not case_id.strip():
        raise InputError(where, f"case id {case_id!r} is not a non-empty string")
    bad = [c for c in ("/", "\\") if c in case_id]
    if bad or case_id in (".", "..") or any(ord(c) < 32 for c in case_id):
        why = f"contains {' and '.join(repr(c) for c in bad)}" if bad else "is not a file name"
        raise InputError(
            where,
            f"case id {case_id!r} would write outside the output folder or is not a file name ({why}); "
            "case ids name output files: use letters, digits, '_', '-', '.'",
        )
    return case_id


def path_inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, refused (:class:`InputError`) unless it resolves inside ``folder`` (symlinks followed).

    For every output path built from input data: ``path_inside(output_dir, f"{case_id}_seg.nii.gz")``.
    """
    base = Path(folder).expanduser()
    target = base / name
    root, resolved = base.resolve(), target.resolve()
    if resolved != root and root not in resolved.parents:
        raise InputError(target, f"resolves to {resolved}, outside the output folder {root}")
    return target


# ----------------------------------------------------------------------------------------------------------------------
# Atomic writing
# ----------------------------------------------------------------------------------------------------------------------

_TEMP_RE = r"\.{name}\.[0-9a-f]+\.tmp(\..*)?"


def temp_name(path: str | os.PathLike, suffix: str = "") -> Path:
    """The hidden temporary file beside ``path`` that :func:`atomic_write` writes first:
    ``.<name>.<12 hex>.tmp<suffix>``; :func:`remove_stale_temps` recognises the pattern (left after a hard kill)."""
    p = Path(path)
    return p.parent / f".{p.name}.{secrets.token_hex(6)}.tmp{suffix}"


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of ``path`` that a killed run left (``.<name>.<hex>.tmp*``); returns them."""
    p = Path(path)
    if not p.parent.is_dir():
        return []
    pattern = re.compile(_TEMP_RE.format(name=re.escape(p.name)))
    removed = []
    for q in p.parent.glob(f".{glob_escape(p.name)}.*.tmp*"):
        if pattern.fullmatch(q.name) and q.is_file():
            logger.warning("removing an unfinished temporary file left by an interrupted run: %s", q)
            q.unlink(missing_ok=True)
            removed.append(q)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, overwrite: bool = True, suffix: str = ""):
    """Context manager yielding the path of a temporary file beside ``path``; on a normal exit it is moved into place
    (``os.replace``; with ``overwrite=False`` by a hard link that fails if ``path`` exists, ``FileExistsError``).

    A reader never sees a half-written ``path``. The temporary file is removed on any exception, ``KeyboardInterrupt``
    and ``SystemExit`` included; after a hard kill it may remain, named as :func:`temp_name` says, and
    :func:`remove_stale_temps` (called by the inference before it writes) removes it. ``suffix`` is appended to the
    temporary name for writers that choose the format from the extension (``.nii.gz``, ``.png``).

    >>> with atomic_write("out/summary.json") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("{}")
    """
    p = Path(path).expanduser()
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p}: file exists; pass --overwrite true to replace it")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(p, suffix)
    # created with mode 0o666 minus the umask, as a plain open() would (mkstemp would leave it private: 0o600)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, p)
        else:
            _link_no_clobber(str(tmp), p)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Persist a rename: fsync the folder entry (a no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_with(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], overwrite: bool = True) -> Path:
    """``path`` written by ``write(binary file)`` through :func:`atomic_write`: flushed and fsynced before the rename,
    the folder entry fsynced after it, so that the new file survives a power cut once this returns.

    >>> atomic_write_with("runs/s1/model_final.pt", lambda f: torch.save(state, f))  # doctest: +SKIP
    """
    p = Path(path).expanduser()
    with atomic_write(p, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(p.parent)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    """``data`` into ``path`` through :func:`atomic_write_with`."""
    return atomic_write_with(path, lambda f: f.write(data), overwrite=overwrite)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", overwrite=overwrite)


def _link_no_clobber(tmp: str, p: Path) -> None:
    # os.link fails if the target appeared meanwhile (another process): no silent overwrite, even in a race
    try:
        os.link(tmp, p)
    except FileExistsError as e:
        raise FileExistsError(f"{p}: file exists; pass overwrite=True to replace it") from e
    except OSError:  # file systems without hard links
        if p.exists():
            raise FileExistsError(f"{p}: file exists; pass overwrite=True to replace it") from None
        os.replace(tmp, p)


def check_output_dir(path: Any, min_free_mb: float = 100.0, option: str = "output_dir") -> Path:
    """The output folder, checked before any case is computed: created if missing; refused (``ValueError`` naming
    ``--<option>``) if it is a file, cannot be created or written (a probe file is created and removed), or has less
    than ``min_free_mb`` MB free. ``path`` may be a number (``--output_dir 20241201`` reaches the config as an int)."""
    if path is None or isinstance(path, bool) or not isinstance(path, (str, int, os.PathLike)):
        raise ValueError(f"--{option} must be a folder path, got {path!r}")
    p = Path(str(path)).expanduser()
    if not str(path).strip():
        raise ValueError(f"--{option} must be a folder path, got an empty string")
    if p.exists() and not p.is_dir():
        raise ValueError(f"--{option} {p}: exists and is not a folder; pass another --{option}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--{option} {p}: cannot be created ({e.strerror or e}); pass another --{option}") from e
    try:
        fd, probe = _probe(p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--{option} {p}: not writable ({e.strerror or e}); pass another --{option}") from e
    free_mb = shutil.disk_usage(p).free / 2**20
    if free_mb < float(min_free_mb):
        raise ValueError(
            f"--{option} {p}: only {free_mb:.0f} MB free on its disk, below the {float(min_free_mb):g} MB the outputs "
            f"may need (min_free_mb); free some space or pass another --{option}"
        )
    return p


def _probe(folder: Path) -> tuple[int, str]:
    probe = str(folder / f".write_probe.{secrets.token_hex(6)}")
    return os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), probe
