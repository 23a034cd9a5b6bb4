"""Atomic output: a file appears complete under its name, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from xcompile.errors import XCompileError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds."""
    target = Path(path)
    if target.is_dir():
        raise XCompileError(f"output '{target}' is a directory, expected a file name")
    if not target.parent.exists():
        raise XCompileError(f"output folder '{target.parent}' does not exist")
    try:
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial" + target.suffix)
    except OSError as exc:
        raise XCompileError(f"cannot write '{target}': {exc.strerror or exc}") from None
    try:
        os.close(fd)
        yield Path(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes it owner-only; give it an ordinary file's mode
        os.replace(temp, target)
    except OSError as exc:  # a full disk, a quota, a folder gone: the output is not written
        Path(temp).unlink(missing_ok=True)
        raise XCompileError(f"cannot write '{target}': {exc.strerror or exc}") from None
    except BaseException:  # including Ctrl-C and SIGTERM (the CLI raises it as an exception)
        Path(temp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
