"""Crash-safe output files: write beside the target, verify, then rename.

Every file the package writes (images, transforms, figures, JSON, checkpoints) goes through
:func:`atomic_output`: the writer fills a temporary file in the target's directory, the file is
checked (not empty, then a format-specific check such as reading the header back), flushed to disk,
given the permissions the umask asks for, and only then renamed onto the target. A failure at any
step removes the temporary file and raises :class:`OutputError`, one line that names the file and
the cause ("No space left on device", ...). The target is never left truncated or half-written.

Native writers (ITK through SimpleITK, HDF5) do not all report a full disk: ITK's NIfTI writer
ignores short writes and exits normally, which is why the checks read the result back, and HDF5
prints dozens of lines of diagnostics on stderr. The diagnostics are held back while a file is
written: replayed when the write succeeds, used to name the cause when it fails.

:func:`output_group` makes several outputs all-or-nothing: the files written inside it are renamed
into place together once all of them were written and checked.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import sys
import tempfile
from typing import Callable, Iterator

from .errors import IncompleteOutput, OutputError

__all__ = ["OutputError", "atomic_output", "output_group", "suffix_of", "write_json"]

# Causes recognised in a native library's error text, most specific first.
_KNOWN_CAUSES = tuple(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO,
                                                      errno.EACCES, errno.ENAMETOOLONG))
# Size of the plain write that finds the cause of a failure a native writer did not explain.
_PROBE_BYTES = 1 << 20


def suffix_of(path: str | os.PathLike) -> str:
    """The file-type suffix: ``.nii.gz`` for ``a.nii.gz``, ``.nrrd`` for ``a.nrrd`` (lower case)."""
    name = os.path.basename(os.fspath(path)).lower()
    for double in (".nii.gz", ".hdr.gz", ".img.gz"):
        if name.endswith(double):
            return double
    return os.path.splitext(name)[1]


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Group:
    """Verified temporary files waiting to be renamed onto their targets together."""

    def __init__(self):
        self.staged: list[tuple[str, str, str]] = []  # (temporary, target, what)

    def discard(self) -> None:
        for tmp, _, _ in self.staged:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        self.staged = []

    def commit(self) -> None:
        done: list[str] = []
        for i, (tmp, path, what) in enumerate(self.staged):
            try:
                os.replace(tmp, path)
            except OSError as e:
                # Outputs of one command stand or fall together: take back those already in place.
                for target in done:
                    with contextlib.suppress(OSError):
                        os.remove(target)
                self.staged = self.staged[i:]
                self.discard()
                raise OutputError(f"cannot write {what} {path!r}: {e.strerror or e}") from None
            done.append(path)
        self.staged = []


_active_group: contextvars.ContextVar[_Group | None] = contextvars.ContextVar("gradicon_fast_output_group",
                                                                              default=None)


@contextlib.contextmanager
def output_group() -> Iterator[None]:
    """Make the outputs written inside all-or-nothing.

    Each :func:`atomic_output` inside writes and checks its temporary file as usual but leaves the
    rename to the end of the group; if anything in the group fails, no target is created or changed.
    A group inside a group joins the outer one.
    """
    if _active_group.get() is not None:
        yield
        return
    group = _Group()
    token = _active_group.set(group)
    try:
        yield
    except BaseException:
        group.discard()
        raise
    finally:
        _active_group.reset(token)
    group.commit()


class _HeldStderr:
    """The process's file descriptor 2 redirected to an in-memory file (native libraries print there)."""

    def __init__(self):
        self.text = ""
        self._saved = None
        self._held = None

    def __enter__(self):
        if os.environ.get("GRADICON_FAST_DEBUG"):  # show the libraries' own diagnostics as they come
            return self
        try:
            sys.stderr.flush()
            self._held = os.memfd_create("held-stderr")  # in memory: the disk may be the full one
            self._saved = os.dup(2)
            os.dup2(self._held, 2)
        except (OSError, ValueError, AttributeError):  # no fd 2 or no memory file: let the output through
            self._close()
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            return False
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.lseek(self._held, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._held, 1 << 16):
            chunks.append(chunk)
        self.text = b"".join(chunks).decode("utf-8", "replace")
        self._close()
        return False

    def replay(self) -> None:
        if self.text:
            sys.stderr.write(self.text)
            sys.stderr.flush()

    def _close(self):
        for fd in (self._held, self._saved):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._held = self._saved = None


def _library_reason(text: str, tmp: str, path: str) -> str:
    """The informative part of a native library's message (ITK's are several lines of source paths),
    naming the target rather than the temporary file."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    reason = lines[0] if lines else ""
    for line in lines:
        if line.startswith("Reason:"):
            reason = line[len("Reason:"):]
            break
        if line.startswith("ITK ERROR:"):
            reason = line.split("):", 1)[-1]
            break
    return reason.replace(tmp, os.path.basename(path)).strip().rstrip(":").strip()


def _probe(directory: str) -> str | None:
    """The error a plain 1 MiB write into ``directory`` gets now (ENOSPC, EDQUOT, EFBIG, EIO...), if any:
    the cause a native writer did not report."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
    except OSError as e:
        return e.strerror
    try:
        pending = memoryview(bytes(_PROBE_BYTES))
        while pending:  # a short write is followed by one that reports the error
            pending = pending[os.write(fd, pending):]
        os.fsync(fd)
    except OSError as e:
        return e.strerror
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(probe)
    return None


def _cause(exc: BaseException, diagnostics: str, tmp: str, path: str) -> str:
    """A short phrase for why writing failed; call it while the partial file still takes up its space.

    An incomplete file where a plain write fails too is blamed on that write's error (a full disk,
    a quota, a file size limit): what a native writer that ignores its short writes leaves behind.
    """
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = f"{exc}\n{diagnostics}"
    for cause in _KNOWN_CAUSES:
        if cause in text:
            return cause
    probed = _probe(os.path.dirname(tmp))
    if probed:
        return probed
    if isinstance(exc, IncompleteOutput):
        return str(exc)
    return _library_reason(str(exc), tmp, path) or type(exc).__name__


def check_output_path(path: str, what: str) -> str:
    """The directory ``path`` will be written to; fails if the file cannot be created there."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OutputError(f"cannot write {what} {path!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise OutputError(f"cannot write {what} {path!r}: directory {directory!r} is not writable")
    if os.path.isdir(path):
        raise OutputError(f"cannot write {what} {path!r}: it is a directory")
    return directory


def require_free_space(path, nbytes: int, *, what: str = "output") -> None:
    """Fail now, with the cause, if ``path``'s filesystem has less than ``nbytes`` left (for writers
    that do not fail cleanly on a full disk)."""
    directory = check_output_path(os.fspath(path), what)
    try:
        st = os.statvfs(directory)
    except OSError:
        return
    free = (st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    if free < nbytes:  # root may use the reserved blocks
        raise OutputError(f"cannot write {what} {os.fspath(path)!r}: {os.strerror(errno.ENOSPC)} (it needs at least "
                          f"{nbytes / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free)")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path, *, what: str = "output", verify: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield a temporary path next to ``path`` (same suffix, so writers that go by the name pick the
    same format); when the body returns, check the file and rename it onto ``path``.

    ``verify(tmp)`` is the format's own check: it raises :class:`IncompleteOutput` (or the reader's
    ``OSError``/``RuntimeError``) if the file is incomplete. On any failure the temporary file is
    removed; a failure to write (an ``OSError``, a native writer's ``RuntimeError``, a failed check,
    anything on a full disk) becomes one :class:`OutputError` that names ``path`` and the cause,
    other errors (a bug in the body) pass through unchanged.
    Inside :func:`output_group` the rename waits for the end of the group.
    """
    path = os.fspath(path)
    directory = check_output_path(path, what)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix_of(path)}",
                                   dir=directory)
    except OSError as e:
        raise OutputError(f"cannot write {what} {path!r}: {e.strerror or e}") from None
    os.close(fd)
    held = _HeldStderr()
    try:
        try:
            with held:
                yield tmp
                if os.path.getsize(tmp) == 0:
                    raise IncompleteOutput("the file is empty")
                if verify is not None:
                    verify(tmp)
            _fsync(tmp)
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600
        except (OSError, RuntimeError, IncompleteOutput) as e:  # RuntimeError: what SimpleITK and torch raise
            raise OutputError(f"cannot write {what} {path!r}: {_cause(e, held.text, tmp, path)}") from e
        except Exception as e:
            probed = None if isinstance(e, OutputError) else _probe(directory)
            if probed is None:
                raise
            raise OutputError(f"cannot write {what} {path!r}: {probed}") from e
        held.replay()
        group = _active_group.get()
        if group is None:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise OutputError(f"cannot write {what} {path!r}: {e.strerror or e}") from None
        else:
            group.staged.append((tmp, path, what))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise



def write_json(path, obj, *, what: str = "output", indent: int = 2) -> None:
    """``json.dump`` crash-safely; the file is parsed back before it is renamed into place."""
    import json

    def parse_back(tmp: str) -> None:
        try:
            with open(tmp) as f:
                json.load(f)
        except ValueError as e:
            raise IncompleteOutput(f"the JSON file read back is incomplete ({e})") from None

    with atomic_output(path, what=what, verify=parse_back) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
