"""Errors of modality adaptation. Each means "the input is wrong" and says what and where; the CLI
prints them as one line (exit code 2)."""

from __future__ import annotations

from mtx_dist.errors import UserError


class AdaptError(UserError, ValueError):
    """Input for modality adaptation that cannot be used."""


class EncoderMismatchError(AdaptError):
    """An adapted model was trained on a different encoder than the one offered to it."""


class DataError(AdaptError):
    """A data file or column that cannot be used as asked."""


class WavFormatError(DataError):
    """A .wav file this reader does not accept (not 16-bit PCM, >2 channels, wrong sample rate)."""
