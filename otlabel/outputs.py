"""Output files that are never half-written: a ``.npy`` memmap filled in a temporary file and renamed into place
only when complete, and a check that no output is one of the inputs (writing labels over the scores being read
would destroy them, and crash the memory-mapped read).
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import tempfile
import threading

import numpy as np

TooHardError = getattr(np, "exceptions", np).TooHardError  # np.exceptions from NumPy 1.25


class OutputError(Exception):
    """An output cannot be written (the command line's exit status 3)."""


def refuse_overwriting_inputs(outputs: dict, inputs: dict, error=ValueError) -> None:
    """Raise ``error`` when an output (name -> path, array or None) is the file of an input or of another output.

    Paths are compared after resolving links; a memory-mapped NumPy input counts by its file. An output memmap, written
    in place, is also compared by inode: through a hard link it is the input's file under another name (an output
    path is renamed into place, which leaves a file under another name intact).
    """
    seen, inodes, in_memory = {}, {}, []
    for is_output, named in ((False, inputs), (True, outputs)):  # inputs first: a clashing output is the culprit
        for name, x in named.items():
            if isinstance(x, np.ma.MaskedArray):  # an output is written through its data: a memmap's, by its file
                x = np.ma.getdata(x)
            memory = _memory_of(x)
            if memory is not None:
                if is_output:
                    for other, other_memory in in_memory:
                        if _overlap(memory, other_memory):
                            raise error(
                                f"{name} shares memory with {other}: it would be written while {other} is still "
                                f"read, giving wrong results and destroying {other}. Pass a separate array "
                                f"(np.empty({tuple(memory.shape)}, np.{memory.dtype.name})) or a path."
                            )
                in_memory.append((name, memory))
            path = _file_of(x)
            if path is None:
                continue
            inode = _inode_of(path)
            clash = seen.get(path)
            if clash is None and isinstance(x, np.memmap):
                clash = inodes.get(inode)
            if is_output and clash is not None:
                raise error(
                    f"{name} {x if isinstance(x, (str, os.PathLike)) else path!r} is the same file as {clash}: "
                    "writing it would destroy that. Choose another path."
                )
            seen.setdefault(path, name)  # two inputs may share a file (features that are their own prototypes)
            if inode is not None:
                inodes.setdefault(inode, name)


def _memory_of(x) -> np.ndarray | None:
    """A NumPy view of an in-memory array or CPU tensor (torch is looked up, not imported: the command line answers
    --help without it), or None for anything else."""
    if isinstance(x, np.ndarray):
        return x
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return None
    x = x.detach()
    if x.dtype == torch.bfloat16:  # NumPy has no bfloat16: the same bytes as int16
        x = x.view(torch.int16)
    try:
        return x.resolve_conj().resolve_neg().numpy()
    except (TypeError, RuntimeError):  # a dtype NumPy lacks: not an output's, and refused elsewhere as input
        return None


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays share an element's bytes: exact for views side by side in one buffer (codes beside the
    scores), and counted as sharing when NumPy finds the question too hard to settle quickly."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=100_000))
    except TooHardError:
        return True


def _file_of(x) -> str | None:
    if isinstance(x, (str, os.PathLike)):
        return os.path.realpath(os.fspath(x))
    if isinstance(x, np.memmap) and x.filename:
        return os.path.realpath(x.filename)
    return None


def _inode_of(path: str) -> tuple | None:
    """The file's (device, inode), the same for every hard link to it; None for a path that names no file yet."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _short_name(path: str, limit: int = 100) -> str:
    """The file name, cut to ``limit`` bytes for a temporary's name: the output's in full made a name near the
    255-byte limit too long for its temporary ("File name too long")."""
    name = os.path.basename(path)
    while len(os.fsencode(name)) > limit:
        name = name[:-1]
    return name


def reserve_space(path: str) -> None:
    """Allocate the disk blocks of a (sparse) file now: a full disk is then an ``OSError`` here, not a SIGBUS that
    kills the process when a memory-mapped write later finds no block to fault in."""
    if hasattr(os, "posix_fallocate"):  # Linux; elsewhere the memmap stays sparse
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)


class AtomicNpy:
    """A ``.npy`` memmap written in a temporary file beside ``path``; :func:`commit_all` fsyncs and renames it."""

    published = False  # renamed into place

    def __init__(self, path: str, dtype, shape: tuple):
        # A symbolic link is written through, as ``open(path, "w")`` would: renaming over the link itself would
        # replace it with a plain file and leave its target stale.
        self.path = os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)
        folder = os.path.dirname(self.path)
        if os.path.isdir(self.path):
            raise OutputError(f"cannot write {path!r}: it is a directory")
        if path.endswith(tuple(filter(None, (os.sep, os.altsep)))):  # abspath drops the slash: 'new/' became file 'new'
            raise OutputError(f"cannot write {path!r}: a path ending in {path[-1]!r} names a directory; give a file "
                              "name, in it or beside it")  # fmt: skip
        if os.path.exists(self.path) and not os.path.isfile(self.path):  # renaming over /dev/null would replace it
            raise OutputError(f"cannot write {path!r}: it is not a regular file (a device, pipe or socket)")
        if not os.path.isdir(folder):
            what = "is a file, not a directory" if os.path.exists(folder) else "does not exist"
            raise OutputError(f"cannot write {path!r}: directory {folder!r} {what}")
        mode = stat.S_IMODE(os.stat(self.path).st_mode) if os.path.exists(self.path) else None
        if mode is not None and not mode & stat.S_IWUSR:  # the rename would replace it: refuse as a write would
            raise OutputError(f"cannot write {path!r}: it is read-only (mode {mode:o}); make it writable "
                              "(chmod u+w) or write elsewhere")  # fmt: skip
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{_short_name(self.path)}.", suffix=".tmp", dir=folder)
            os.close(fd)
        except OSError as err:
            raise OutputError(f"cannot write {path!r}: {err.strerror or err}") from None
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(self.tmp, mode)  # mkstemp makes 0600: a replaced output keeps its mode, a new one the usual
        try:
            self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=shape)
            reserve_space(self.tmp)
        except OSError as err:
            self.discard()
            raise OutputError(f"cannot write {path!r}: {err.strerror or err}") from None

    def prepare(self) -> None:
        """Flush and fsync the temporary file (the slow part; an error or a signal here leaves nothing behind)."""
        try:
            self.array.flush()
            del self.array
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as err:
            self.discard()
            raise OutputError(f"cannot write {self.path!r}: {err.strerror or err}") from None

    def publish(self) -> None:
        """Rename the prepared file into place, then fsync the directory (the rename itself durable)."""
        try:
            os.replace(self.tmp, self.path)
        except OSError as err:
            self.discard()
            raise OutputError(f"cannot write {self.path!r}: {err.strerror or err}") from None
        self.published = True
        try:
            dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass

    def discard(self) -> None:
        self.__dict__.pop("array", None)
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def commit_all(files: list) -> None:
    """Put several outputs in place together: every file is flushed and fsynced first (an error or a signal there
    leaves all the previous outputs), then all are renamed with SIGINT/SIGTERM/SIGHUP deferred, so an interrupted
    run never leaves new codes next to old labels. A signal that came meanwhile is raised again once all are in
    place. (Deferred by Python handlers, not ``pthread_sigmask``: that masks one thread, and the signal then goes
    to one of torch's.) Callers put the labels last: then whoever finds new labels finds the new codes too, even
    where nothing can be deferred (a rename that fails, SIGKILL between two renames: new codes beside old labels)."""
    for f in files:
        f.prepare()
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    deferrable = threading.current_thread() is threading.main_thread()
    caught, previous = [], {}
    if deferrable:
        for sig in (getattr(signal, name) for name in names if hasattr(signal, name)):
            handler = signal.getsignal(sig)
            if handler not in (signal.SIG_IGN, None):
                previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        for f in files:
            f.publish()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in caught[:1]:
            signal.raise_signal(sig)  # now handled as it would have been
