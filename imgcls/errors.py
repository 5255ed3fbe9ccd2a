"""Errors a user can cause and fix. Each carries a one-line message naming the problem.

The command line prints these without a traceback and exits 2; anything else is a bug (exit 1).
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class ImgclsError(Exception):
    """Base of every error caused by input: a bad path, a bad setting, an unknown name."""


class ConfigError(ImgclsError):
    """A setting has a value that cannot work (unknown name, out of range, contradictory)."""


class DataError(ImgclsError):
    """The data cannot be used: missing folder, no classes, unreadable images, too few images."""
