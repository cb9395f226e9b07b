"""Errors a user can act on.

Every error stalwart raises for bad input, corrupt data or a misuse derives from
:class:`StalwartError`; its message names what failed and where (step, tensor,
file, byte range). The CLI prints these as one line, never as a traceback.
"""

from __future__ import annotations


class StalwartError(Exception):
    """Base class of all user-facing stalwart errors."""


class FormatError(StalwartError):
    """A checkpoint on disk is malformed, incomplete or from an unsupported version."""


class ChecksumError(FormatError):
    """Bytes read back do not match the checksum recorded when they were written."""


class LayoutError(StalwartError):
    """A layout is inconsistent with the tensors it describes, or a reshard is impossible."""


class ConversionError(StalwartError):
    """A foreign checkpoint cannot be read or written as asked."""
