"""The errors the commands turn into one line on stderr and exit status 2.

:class:`UsageError` is a problem with what the user asked for (a path, a preset, data, a
config); :class:`CheckpointError` is one kind of it: a checkpoint (an SRA run's or a
Hugging Face folder) that is missing, damaged or cannot be read. Both are ``ValueError``
s, so library callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "UsageError"]


class UsageError(ValueError):
    """A problem with what the user asked for: bad path, preset, data or config.

    The CLI prints it as one line to stderr and exits with status 2.
    """


class CheckpointError(UsageError):
    """A checkpoint that is missing, damaged or unreadable; the message names the file."""
