"""Files a user names on the command line, read so that every failure is one line naming the file."""

from __future__ import annotations

from pathlib import Path


def read_text(path: Path, what: str, expected: str, error: type[ValueError] = ValueError) -> str:
    """The UTF-8 text of ``path``; raises ``error`` ("<what> <path> not found; <expected>", or cannot
    be read, or is not UTF-8 text) otherwise."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} not found; {expected}") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc}); {expected}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text; {expected}") from None
