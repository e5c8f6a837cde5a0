"""Output directories: where a command may write, who may write there now, and saying why not.

Every command that writes a directory (``export --out``, ``tokenize --out``, ``tiny-model --out``,
``train --out-dir``) goes through here:

- :func:`real_target` follows a symlinked ``--out`` to the directory it names, so the link itself is
  never replaced and temporaries are made beside the real directory;
- :func:`refuse_protected` refuses a target that is the adapter, the base model or an input (or holds
  one, or lies inside one), the working directory or one of its ancestors, the home directory or ``/``,
  with or without ``--overwrite``;
- :func:`refuse_foreign` refuses a non-empty directory that plora did not write unless ``--overwrite``
  (each command says what it recognises as its own);
- :func:`lock` takes an advisory lock, so a second concurrent writer stops at once with one line. The
  lock file is a hidden sibling, ``.<name>.plora-lock``, because an exported model replaces its whole
  directory by a rename; it is removed when the writer is done.

Standard library only: the trainer imports it on a bare GPU machine.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from parallel.errors import PloraError, first_line

LOCK_SUFFIX = ".plora-lock"

# (what it is, its path); a path that does not exist here (a hub id) protects nothing.
Protected = tuple[str, str | Path | None]


def real_target(path: str | Path) -> Path:
    """The absolute directory ``path`` names, every symlink followed (it need not exist yet)."""
    return Path(os.path.realpath(path))


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def holds(directory: str | Path, path: str | Path) -> bool:
    """Whether ``path`` is ``directory`` or lies inside it, every symlink followed."""
    return _inside(real_target(path), real_target(directory))


def refuse_protected(
    out: str | Path, flag: str, inputs: Iterable[Protected] = (), *, may_hold_inputs: bool = False
) -> None:
    """Raise PloraError if ``out`` is, holds or lies inside a protected path (``--overwrite`` or not).

    ``may_hold_inputs``: the command only ever removes its own files, so an ``out`` that holds an input
    (train's ``out/shards/`` of the guide script) is harmless; it still may not be or lie inside one.
    """
    target = real_target(out)
    for what, path in inputs:
        if path is None or not Path(path).exists():
            continue
        protected = real_target(path)
        if _inside(target, protected):
            relation = "is" if target == protected else "lies inside"
        elif not may_hold_inputs and _inside(protected, target):
            relation = "holds"
        else:
            continue
        raise PloraError(f"{flag} {out}: {relation} {what} {path}; choose another {flag}")
    places = [
        ("the current working directory", Path.cwd()),
        ("your home directory", Path.home()),
        ("the root directory", Path("/")),
    ]
    for what, path in places:
        place = real_target(path)
        if _inside(place, target):
            relation = "is" if target == place else "holds"
            raise PloraError(f"{flag} {out}: {relation} {what}; choose another {flag}")


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def refuse_foreign(
    out: str | Path,
    flag: str,
    overwrite: bool,
    is_own: Callable[[Path], bool],
    *,
    overwrite_does: str = "replace it",
) -> None:
    """Raise PloraError if ``out`` is a non-empty directory that ``is_own`` does not recognise as
    plora's, unless ``overwrite``; or if it exists and is not a directory."""
    target = real_target(out)
    if target.exists() and not target.is_dir():
        raise PloraError(f"{flag} {out}: exists and is not a directory")
    if overwrite or not is_nonempty_dir(target) or is_own(target):
        return
    raise PloraError(
        f"{flag} {out}: is not empty and plora did not write it; "
        f"pass --overwrite to {overwrite_does}, or choose another {flag}"
    )


def lock_path(out: str | Path) -> Path:
    target = real_target(out)
    return target.with_name(f".{target.name}{LOCK_SUFFIX}")


@contextmanager
def lock(out: str | Path, flag: str, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive advisory lock on the directory ``out`` while the block writes it (the lock
    file's directory, ``out``'s parent, is created if need be).

    A second writer fails at once with one line naming ``out`` (``wait``: it waits its turn instead).
    The lock file is unlinked while still locked, so a waiter that opened the old file checks that its
    lock is on the file the name still points at, and tries again otherwise.
    """
    path = lock_path(out)
    while True:
        fd = _open_lock_file(path, out, flag)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            who = f" (pid {holder})" if holder else ""
            raise PloraError(
                f"{flag} {out}: another plora process{who} is writing there; wait for it to finish"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def is_write_failure_in(out: str | Path, err: OSError) -> bool:
    """Whether ``err`` comes from writing into ``out``: it names a path there, or none at all (Arrow's
    writers name none); an unreadable input names itself."""
    if err.filename is None:
        return True
    return _inside(real_target(err.filename), real_target(out))


def _open_lock_file(path: Path, out: str | Path, flag: str) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a file where a parent directory should be, a read-only place, ...
        raise PloraError(f"{flag} {out}: cannot write there: {err.strerror or err}") from None


def write_failure(path: str | Path, what: str, err: BaseException) -> PloraError:
    """One line for a failed write (disk full, permissions): the user's ``path``, never a temporary
    one, and the system's reason (safetensors wraps it in its own error text)."""
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:
        text = first_line(err)
        found = re.search(r'message: "([^"]*)"|I/O error: (.*?) \(os error \d+\)', text)
        reason = next(group for group in found.groups() if group) if found else text
    return PloraError(f"{path}: cannot write {what}: {reason}")
