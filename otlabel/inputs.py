"""Opening the inputs: a ``.npy`` path (memory-mapped, never unpickled), a NumPy array or memmap, or a torch tensor,
as a torch tensor that shares its memory, with errors that say which input is wrong and how to fix it. An array in
non-native byte order (a big-endian file), which torch cannot share, is read through a :class:`SwappedArray`, each
block converted as it is read.

The streamed, features, sharded and command-line paths open their inputs here (in-memory scores go through
:func:`otlabel.problem.as_tensor`).
"""

from __future__ import annotations

import math
import os
import tokenize

import numpy as np
import torch

from .problem import (
    blockwise_copy,
    check_float_dtype,
    complex_conversion,
    dense_tensor,
    refuse_unconvertible_dtype,
    share_numpy,
    torch_cannot_share,
    unmasked_array,
)


def unreadable_npy(name: str, path: str, err: Exception) -> str:
    """The message for a file ``np.load`` cannot read as an array (NumPy's own advice for a non-``.npy`` file,
    to "load it unsafely" as a pickle, is wrong there and risky: it is left out)."""
    if not os.path.isfile(path) and not os.path.isdir(path):  # its size reads 0: it was said to be empty
        detail = "it is a pipe or a device, not a file on disk: inputs are read in place, so save it to a file first"
    elif isinstance(err, EOFError) or os.path.getsize(path) == 0:
        detail = "it is empty"
    elif "Object arrays" in str(err) or "Python objects" in str(err):  # read whole / memory-mapped: NumPy's words
        detail = "it is a .npy of Python objects (dtype object), not of numbers"
    elif "pickle" in str(err):  # no .npy header: NumPy takes the file for a pickle
        detail = "it is not in NumPy's .npy format"
    elif isinstance(err, (tokenize.TokenError, SyntaxError)):  # the header is no Python dict
        detail = "its header is damaged: NumPy cannot parse it"
    elif "mmap length is greater than file size" in str(err):  # NumPy's words for it, memory-mapped
        detail = "it is shorter than its header says: cut short (a copy or save that did not finish?) or damaged"
    elif isinstance(err, OverflowError):  # a shape beyond 64 bits, or a negative one memory-mapped
        detail = f"its header is damaged: {err}"
    else:
        detail = str(err)
    return f"{name} file {path!r} is not a readable .npy array ({detail}). Save arrays with numpy.save."


def load_npy(path: str, name: str, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of one ``.npy`` array (memory-mapped with ``mmap_mode``), no pickles; a missing file is a
    ``FileNotFoundError``, anything else that is not a .npy array (an .npz archive, a pickle) a ``ValueError``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} file {path!r} does not exist.")
    if not os.path.isfile(path) and not os.path.isdir(path):  # <(...) in a shell: NumPy seeks, which a pipe cannot
        raise ValueError(unreadable_npy(name, path, OSError()))  # (and a FIFO with no writer yet would hang on open)
    try:
        x = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    # A damaged header escapes np.load as tokenize's TokenError ('(5, 3' for a shape) or an OverflowError (a shape
    # beyond 64 bits, or a negative one memory-mapped), not a ValueError.
    except (ValueError, OSError, EOFError, OverflowError, SyntaxError, tokenize.TokenError) as err:
        raise ValueError(unreadable_npy(name, path, err)) from None
    if isinstance(x, np.lib.npyio.NpzFile):  # the array checks would say "got NpzFile", naming no fix
        arrays = ", ".join(x.files) or "none"
        x.close()
        if any(f == "data.pkl" or f.endswith("/data.pkl") for f in x.files):  # torch.save's zip, which np.load opens
            raise ValueError(f"{name} file {path!r} is a PyTorch file (torch.save), not a .npy file: save the tensor "
                             "with NumPy, np.save('array.npy', torch.load(path).numpy()) (.float() before .numpy() "
                             "for bfloat16).")  # fmt: skip
        raise ValueError(f"{name} file {path!r} is an .npz archive (arrays: {arrays}), not a .npy file: save the "
                         "array to use on its own, np.save('array.npy', np.load(path)['name']).")  # fmt: skip
    return x


class SwappedArray:
    """A NumPy array (a ``.npy`` memmap) that torch cannot share: in non-native byte order, such as big-endian
    ``'>f4'`` from another machine, or a view with a negative stride (``x[::-1]``). Read as torch tensors one index at
    a time (``x[:, rows]``, ``x[lo:hi]``, ``x[j]``), each block copied in native order with positive strides as it is
    read, so that a file larger than RAM is never converted whole. It stands in for the shared CPU tensor of
    :func:`open_host_array` in the streamed sources: the shape, dtype (the native one), device and indexing they
    use."""

    device = torch.device("cpu")

    def __init__(self, array: np.ndarray):
        self.array = array
        self.native = array.dtype.newbyteorder("=")
        self.dtype = torch.from_numpy(np.empty(0, self.native)).dtype
        self.shape = torch.Size(array.shape)
        self.ndim = array.ndim

    def __getitem__(self, index) -> torch.Tensor:
        # a native copy of just these entries, in the layout of their view (a Fortran-ordered file stays so)
        return torch.from_numpy(np.array(self.array[index], dtype=self.native, order="K"))

    def unsqueeze(self, dim: int) -> SwappedArray:
        return SwappedArray(np.expand_dims(self.array, dim))

    def numel(self) -> int:
        return self.array.size

    def element_size(self) -> int:
        return self.array.itemsize

    def is_pinned(self) -> bool:
        return False


# Entries in a block of the conversion :func:`block_conversion` advises: 64 MiB of float32 written at a time
BLOCK_ENTRIES = 1 << 24


def _on_disk(x: np.ndarray) -> bool:
    """Whether ``x`` reads a file (np.load's memmap or a view of it), not memory: a copy of a memmap (``x.copy()``,
    a reshape that copies) is still of type np.memmap, but has no file (``x.astype`` converts it)."""
    return isinstance(x, np.memmap) and x.ndim > 0 and x.filename is not None


def block_conversion(x: np.memmap, part: str) -> str:
    """The advice to convert a memory-mapped file ``x`` to a float32 file a block of rows at a time, each block of about
    :data:`BLOCK_ENTRIES` values, since ``x.astype`` would read it whole. ``part`` is what a block of the new file is
    set to, ``{rows}`` standing for the block of ``x``. The rows are the samples: in an (H, N, K) file of heads, the
    second axis (blocks of the first, the heads, were the whole file). The blocks are the file's, of which ``x`` may
    be a view: then the advice ends with the same view of the new file."""
    file, opening, start = _whole_file(x) or (x, None, 0)  # None: x itself is converted
    heads = file.ndim == 3
    row = math.prod(file.shape[1:]) if not heads else file.shape[0] * file.shape[2]  # entries of a row
    step = max(1, BLOCK_ENTRIES // max(1, row))  # rows a block
    rows, count = (f"[:, i : i + {step}]", "x.shape[1]") if heads else (f"[i : i + {step}]", "len(x)")
    advice = ("Convert the file a block of rows at a time (not whole: it would be read into memory at once): "
              + (f"x = {opening}, " if opening else "")
              + blockwise_copy("'new.npy'", "np.float32", "x.shape", rows, part.format(rows="x" + rows), count, step)
              + (", x being your array." if not opening else "."))  # fmt: skip
    view = _same_view(x, file, start) if opening else "y"
    if view != "y":  # a view of the file (reversed, sliced...), which y is not
        advice += (" That converts the whole file in its own layout, which your array changes: pass "
                   + (f"{view}, your view of the new file." if view else "the same view of the new file (slice, "
                      "transpose, reversal) as your array is of this one."))  # fmt: skip
    return advice


def transposed_file_advice(path: str, shape: tuple) -> str:
    """How to save a scores file of ``shape``, (K, N) or (H, K, N) (clusters by samples), as (N, K) or (H, N, K), in
    C order (the streamed passes read it a block of samples at a time): a block of samples at a time, each of about
    :data:`BLOCK_ENTRIES` values, where ``np.swapaxes`` of the file, saved, would read it into memory at once."""
    *heads, rows, columns = shape  # rows: the clusters, columns: the samples
    step = max(1, BLOCK_ENTRIES // max(1, rows * math.prod(heads)))  # samples a block
    axes = ":, " * len(heads)
    value = f"x[{axes}:, i : i + {step}]" + (".T" if not heads else ".swapaxes(-1, -2)")
    return (f"a block of rows at a time: x = np.load({path!r}, mmap_mode='r'), "
            + blockwise_copy("'new.npy'", "x.dtype", str((*heads, columns, rows)), f"[{axes}i : i + {step}]", value,
                             columns, step))  # fmt: skip


def _whole_file(x: np.memmap) -> tuple[np.ndarray, str, int] | None:
    """The whole file that ``x`` is a view of, as the advice opens it; the expression that opens it; and where in it
    ``x`` starts (bytes from its first value to the first of ``x``). A ``.npy`` is opened as ``np.load`` opens it (a
    Fortran-ordered one too), down to the field ``x`` reads of its records (``np.load(path, mmap_mode='r')['score']``);
    a raw file as ``x``'s memmap was opened. None where neither gives ``x``'s dtype (a field of a raw file's
    records)."""
    opened = x  # the memmap as opened (x itself, or the array x is a view of): byte opened.offset of the file
    while isinstance(opened.base, np.ndarray):
        opened = opened.base
    at = x.ctypes.data - opened.ctypes.data + opened.offset  # the byte of the file where x starts
    try:
        loaded = np.load(x.filename, mmap_mode="r")
    except (OSError, ValueError, TypeError):  # no .npy header: a raw file
        loaded = None
    if isinstance(loaded, np.ndarray):  # (not a .npz that a raw file looks like)
        file, index = loaded, ""
        if loaded.dtype.names and loaded.dtype != x.dtype:  # x reads a field of the file's records
            for name in _field_at(loaded.dtype, (at - loaded.offset) % loaded.itemsize, x.dtype) or []:
                file, index = file[name], f"{index}[{name!r}]"
        if file.dtype == x.dtype:
            file_at = loaded.offset + file.ctypes.data - loaded.ctypes.data  # the byte where the file (field) starts
            return file, f"np.load(path, mmap_mode='r'){index}", at - file_at
    if opened.dtype != x.dtype:
        return None
    order = ", order='F'" if opened.flags.f_contiguous and not opened.flags.c_contiguous else ""
    opening = f"np.memmap(path, np.dtype({x.dtype.str!r}), 'r', offset={opened.offset}, shape={opened.shape}{order})"
    return opened, opening, at - opened.offset


def _field_at(dtype: np.dtype, byte: int, values: np.dtype) -> list[str] | None:
    """The names leading to the field of the records ``dtype`` that holds byte ``byte`` of a record (nested records
    searched too), where that field's values are of dtype ``values``; None where there is none."""
    for name, (field, offset, *_) in dtype.fields.items():  # (a third item: the field's title)
        if offset <= byte < offset + field.itemsize:
            inner = (byte - offset) % field.base.itemsize  # a subarray field ('<f4', (K,)): within one of its values
            if field.base.names:
                path = _field_at(field.base, inner, values)
                return None if path is None else [name, *path]
            return [name] if field.base == values else None
    return None


def _same_view(x: np.memmap, file: np.ndarray, start: int) -> str | None:
    """What view of ``y``, the file converted (C-ordered, in the file's shape), holds ``x``'s values, where ``x``
    starts ``start`` bytes into ``file``: ``y`` itself, ``y.T``, ``y[::-1]``, ``y.transpose(...)[:, ::-1]`` where
    ``x`` reorders and reverses the axes of the whole file, ``y.reshape(...)`` where it reads the whole file in the
    order it is stored; ``None`` where it is none of these (a slice, a step).

    Each candidate is made as that view of ``file`` and kept only where it reads exactly the bytes ``x`` reads (the
    same shape, start and strides, those of size-1 axes aside): the same view of ``y`` then holds ``x``'s values."""
    if x.size != file.size:  # a slice, or a memmap opened on part of the file
        return None
    if not x.size:  # no values to reorder
        return "y" if x.shape == file.shape else None

    def reads_as_x(view: np.ndarray) -> bool:
        strides = zip(x.shape, view.strides, x.strides, strict=True)
        return (view.shape == x.shape and view.ctypes.data - file.ctypes.data == start
                and all(n == 1 or a == b for n, a, b in strides))  # fmt: skip

    if x.ndim == file.ndim:  # file.transpose(axes)[flips]: x's axes matched to the file's by their strides' size
        axes = [0] * x.ndim  # x's axis j is the file's axis axes[j]
        for j, a in zip(_by_stride(x), _by_stride(file), strict=True):
            axes[j] = int(a)
        flips = [n > 1 and stride < 0 for n, stride in zip(x.shape, x.strides, strict=True)]
        if reads_as_x(file.transpose(axes)[tuple(slice(None, None, -1 if flip else 1) for flip in flips)]):
            view = "y"
            if axes != sorted(axes):
                view += ".T" if x.ndim == 2 else f".transpose{tuple(axes)}"
            if any(flips):
                last = max(j for j, flip in enumerate(flips) if flip)
                view += f"[{', '.join('::-1' if flip else ':' for flip in flips[: last + 1])}]"
            return view
    shape = ", ".join(map(str, x.shape))
    if file.flags.c_contiguous and reads_as_x(file.reshape(x.shape)):  # the file's values in order, reshaped
        return f"y.reshape({shape})"
    if file.flags.f_contiguous and reads_as_x(file.reshape(x.shape, order="F")):  # ... a Fortran-ordered file's
        return f"y.reshape({shape}, order='F')"
    return None


def _by_stride(a: np.ndarray) -> np.ndarray:
    """``a``'s axes, those of size 1 first, then from the largest stride (in size) to the smallest."""
    return np.argsort([-abs(stride) if n > 1 else -np.inf for n, stride in zip(a.shape, a.strides, strict=True)],
                      kind="stable")  # fmt: skip


def open_host_array(x, name: str, copied_anyway: bool = False) -> torch.Tensor | SwappedArray:
    """A path to a ``.npy`` (memory-mapped, read-only), a NumPy array/memmap or a torch tensor, as a torch tensor
    sharing its memory (no copy). Errors say which input is wrong and why. Callers that copy the data anyway say so
    with ``copied_anyway``: a NumPy view with a negative stride or an array in non-native byte order (big-endian),
    which torch cannot share, is then copied (in native order, with positive strides), else returned as a
    :class:`SwappedArray`, converted block by block as the streamed sources read it."""
    from_path = isinstance(x, (str, os.PathLike))
    if from_path:
        x = load_npy(os.fspath(x), name, mmap_mode="r")
    if isinstance(x, SwappedArray):  # opened already (the command line opens its inputs for their shapes first)
        if not copied_anyway:
            return x
        x = x.array
    if isinstance(x, np.ndarray):
        x = unmasked_array(x, name)
        # a file, perhaps larger than memory, is converted a block at a time
        file_advice = (lambda part, x=x: block_conversion(x, part)) if _on_disk(x) else None
        refuse_unconvertible_dtype(x, name, from_path, file_advice)
        if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
            fix = "Convert with x.astype(np.float32)."
            part = "{rows}"  # what a block of the new file is set to
            if x.dtype.kind == "c":  # astype(np.float32) keeps the real part alone (NumPy's ComplexWarning aside)
                fix = complex_conversion("x", "np.abs(x)", "x.astype(np.float32)")
                part = "{rows}.real (or np.abs({rows}), whichever you mean)"
            if file_advice:  # x.astype would read the file whole
                fix = file_advice(part)
            raise TypeError(f"{name} must be float16, float32 or float64, got dtype {x.dtype}. {fix}")
        if not x.dtype.isnative:  # a file from another machine: torch cannot share it
            if not copied_anyway:
                return SwappedArray(x)
            x = x.astype(x.dtype.newbyteorder("="))  # in native order, and with positive strides
        if torch_cannot_share(x):  # a reversed view, a field of packed records
            if not copied_anyway:
                return SwappedArray(x)
            x = np.ascontiguousarray(x)
        return share_numpy(x)
    if isinstance(x, torch.Tensor):
        x = dense_tensor(x, name)  # detached: a target, not differentiated through (see problem.as_tensor)
        check_float_dtype(x, name)
        return x
    raise TypeError(f"{name} must be a .npy path, a numpy array or a torch tensor, got {type(x).__name__}.")
