"""The error and warning types of bad user input, shared by every reader and writer of the bundle.

An :class:`InputError` names the offending file first; an :class:`InputWarning` flags a suspicious but usable input
(collected into the case's QC JSON). :func:`find_input_error` digs the :class:`InputError` out of MONAI's
``Compose`` wrapping, so that a script can show the user the real message.
"""

from __future__ import annotations

import os
import warnings

__all__ = ["InputError", "InputWarning", "find_input_error", "warn_input"]


class InputError(ValueError):
    """A user input that cannot be used; ``str(err)`` always starts with the offending path.

    >>> str(InputError("/data/ct.nii.gz", "truncated gzip"))
    '/data/ct.nii.gz: truncated gzip'
    """

    def __init__(self, path: str | os.PathLike | None, message: str):
        super().__init__(path, message)  # all arguments: the error pickles (DataLoader workers) and copies intact
        self.path = None if path is None else str(path)
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message


def find_input_error(exc: BaseException | None) -> InputError | None:
    """The :class:`InputError` behind ``exc``, if any: MONAI's ``Compose`` re-raises every transform error as
    ``RuntimeError("applying transform ...")``, so an inference script can show the user the real message.

    >>> try:
    ...     raise RuntimeError("applying transform") from InputError("ct.nii.gz", "truncated gzip")
    ... except RuntimeError as e:
    ...     str(find_input_error(e))
    'ct.nii.gz: truncated gzip'
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class InputWarning(UserWarning):
    """A suspicious but usable input (non-finite voxels, intensities that do not look like HU, ...)."""


def warn_input(path: str | os.PathLike | None, message: str) -> None:
    """Warn (:class:`InputWarning`) ``"<path>: <message>"``, attributed to the caller of the function that warns."""
    warnings.warn(f"{path}: {message}" if path is not None else message, InputWarning, stacklevel=3)
