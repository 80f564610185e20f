"""Input checking: turns what a user passed into a validated :class:`Problem`, or says what is wrong.

Every error names the problem and the fix. Checks that need a pass over the scores (NaN, +inf,
infeasible masks) are done once here, so backends and kernels may assume clean input. Scores that are never
whole in memory (streamed in chunks, sharded over ranks) get the same checks in pieces: :func:`check_rows` on
each chunk of samples, :func:`check_columns` on the column maxima accumulated over all of them.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import sys
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .advice import ScoreSummary, dense_summary
from .cached import uniform_weights
from .sources import column_max

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WEIGHT_SUM_RTOL = 1e-4
# The largest |S| / eps solved faithfully, by the precision S / eps + b is formed in (the potentials b are of that
# size, and cancel against S / eps). float64: the marginal error read from the potentials' differences carries
# ~2e-5 of rounding at 1e11 (at 1e17 a solve reported convergence with the marginals off by 0.5). float32 (the
# compute precision of fp32/fp16/bf16 scores): each entry of S / eps + b is rounded by up to 6e-8 x |S| / eps nats,
# and the codes' marginals drift from the reported error by up to ~2e-8 x |S| / eps (measured on uniform scores with
# a common, per-sample or per-cluster offset, torch, streamed and Triton paths). 3e3 keeps that near the default
# tol: at 5e3 codes missed 1e-4 by 2e-5 (64 x 32); at 1e4 the Triton path stalled at 2.6e-4 (200 x 20) and at
# 8e4 the torch path reported convergence with its codes off by 2.6x tol. A later sweep of tiny problems (N 4-64,
# K 3-8, every score within 10 nats of the largest, 2026-11-23) found the drift up to ~4e-8 x |S| / eps: converged
# solves whose codes missed tol=1e-4 by up to 1.33x (torch, 10 of 300) and 1.58x (Triton, 9 of 60) at 3e3, 1.05x
# and 1.20x at 1.5e3, none at 1e3. The limit stays (lower would refuse common logits); README says it.
# A sweep of N 1-3, K 2-3 (2026-11-24) found up to 6.7e-8 x |S| / eps (2.4x tol at N 1, K 2 with over_relaxation=1.9);
# float64 drifts by ~5e-17 x |S| / eps (~5e-6 near 1e11). README says both.
MAX_SCORE_SPAN = 1e11
MAX_SCORE_SPAN_FP32 = 3e3
TRANSPOSE_FIX = "pass scores.swapaxes(-1, -2) (a view, for torch tensors and NumPy arrays alike)"
TRANSPOSE_PATH_FIX = (
    'pass np.load(path, mmap_mode="r").swapaxes(-1, -2) instead of the path (a view: nothing is copied)'
)


def max_score_span(compute_dtype: torch.dtype) -> float:
    return MAX_SCORE_SPAN if compute_dtype == torch.float64 else MAX_SCORE_SPAN_FP32


def arithmetic_name(compute_dtype: torch.dtype) -> str:
    return "float64" if compute_dtype == torch.float64 else "float32"


class ScoreSpanError(ValueError):
    """Scores too large for their temperature: ``|scores| / epsilon`` beyond 3e3 for float32, float16 or bfloat16
    scores (1e11 for float64), where the arithmetic cannot resolve the balanced plan. A ``ValueError``.

    What to do, as the message says: subtract each sample's maximum (``scores - scores.amax(-1, keepdim=True)``) or,
    for a cluster far below the rest, each cluster's (``scores.amax(-2, keepdim=True)``) — such shifts change nothing
    in the plan —, pass float64 scores, or a larger ``epsilon``. Features: L2-normalise them and the prototypes.

    ``parts`` and ``closed`` keep what the message was made from (:func:`span_error`), so that the command line can
    say the fixes in its own terms (files saved anew, ``--epsilon``)."""

    def __init__(self, message: str, *parts, closed: int | None = None):
        super().__init__(message)
        self.parts = parts  # span_error's arguments: span_error(*parts, files=True, closed=closed) says it for files
        self.closed = closed


def blockwise_copy(target: str, dtype: str, shape: str, rows: str, value: str, count: str, step) -> str:
    """The one form every piece of file advice takes (a file may not fit in memory: it is streamed): a new ``.npy``
    ``target`` of ``dtype`` and ``shape`` opened for writing, its blocks of rows ``y<rows>`` set to ``value`` for ``i``
    in steps of ``step`` up to ``count``, then flushed. The arguments are Python expressions, as the advice prints
    them."""
    return (f"y = np.lib.format.open_memmap({target}, 'w+', {dtype}, {shape}), then y{rows} = {value} for i in "
            f"range(0, {count}, {step}), and y.flush()")  # fmt: skip


_STEP = 4096  # rows a block in the file advice below
_BLOCK = f"[i : i + {_STEP}]"
# The shifts and normalisations that keep the plan, by (features, files): as tensor expressions for the API, as files
# saved anew for the command line (see span_error).
_SPAN_FIXES = {
    (False, False): (
        "Subtract each sample's maximum (scores - scores.amax(-1, keepdim=True)) or, for a cluster far "
        "below the rest, each cluster's (scores.amax(-2, keepdim=True)): such shifts change nothing. Or "
    ),
    (True, False): (  # a bias entry far below the rest is cured by no shift shared by all clusters: drop the bias
        "L2-normalise the features and the prototypes (cosine scores, as SwAV does), drop the bias if you pass one "
        "(bias=None: a per-cluster shift, it changes no label or code, only cluster_potentials and the objective), "
    ),
    (False, True): (
        "Save the scores shifted by each sample's maximum, a block of rows at a time: x = np.load(path, "
        "mmap_mode='r'), "
        + blockwise_copy(
            "'shifted.npy'",
            "x.dtype",
            "x.shape",
            _BLOCK,
            f"x{_BLOCK} - x{_BLOCK}.max(axis=-1, keepdims=True)",
            "len(x)",
            _STEP,
        )
        + f"; or, for a cluster far below the rest, by each cluster's maximum (the largest of x{_BLOCK}.max(axis=-2, "
        "keepdims=True) over the blocks, from a first pass): such shifts change nothing (for an (H, N, K) file, the "
        "same for each head x[h]). Or "
    ),
    (True, True): (
        "Save the features and the prototypes L2-normalised (cosine scores, as SwAV does), each into a new file, a "
        "block of rows at a time: x = np.load(path, mmap_mode='r'), "
        + blockwise_copy(
            "'normalised_' + os.path.basename(path)",
            "x.dtype",
            "x.shape",
            _BLOCK,
            f"x{_BLOCK} / np.linalg.norm(x{_BLOCK}, axis=-1, keepdims=True)",
            "len(x)",
            _STEP,
        )
        + "; "
    ),
}


def span_error(span_over_eps: float, compute_dtype: torch.dtype, detail: str = "", features: bool = False,
               files: bool = False, closed: int | None = None) -> ScoreSpanError:  # fmt: skip
    """The error for scores too large for their temperature, with the fixes that keep the same plan (``features``:
    the scores are features @ prototypes.T + bias, which the caller cannot shift directly; ``files``: the inputs
    are ``.npy`` files named on a command line, where a tensor expression cannot be applied: they are saved anew;
    ``closed``: a weighted cluster far below the rest, whose scores may be a mask fill (:func:`mask_fill_note`))."""
    limit, arithmetic = max_score_span(compute_dtype), arithmetic_name(compute_dtype)
    # float64 input is already solved in float64: suggesting it again would send the caller in a circle.
    what = "features" if features else "scores"
    pass_float64 = f"save the {what} as float64" if files else f"pass float64 {what}"
    wider = "" if compute_dtype == torch.float64 else f"{pass_float64} (allowed up to 1e11), or "
    fixes = _SPAN_FIXES[features, files] + (wider or ("or " if features else ""))
    last = "give a larger --epsilon" if files else "raise epsilon"
    last += " (it is in the units of the scores: 0.05 for cosine similarities)."
    message = (
        f"scores / epsilon reach {span_over_eps:.3g}{detail}: beyond {limit:.0e}, {arithmetic} arithmetic cannot "
        f"resolve the balanced plan to the default tol. {fixes}{last}"
    )
    if closed is not None:
        message += mask_fill_note(closed, features, files)
    return ScoreSpanError(message, span_over_eps, compute_dtype, detail, features, closed=closed)


def mask_fill_note(k: int, features: bool = False, files: bool = False) -> str:
    """For a weighted cluster far below the rest: the shifts :func:`span_error` offers would fill it as the balanced
    plan must, which is wrong if its scores (or its bias) are a mask written as a large finite value."""
    what = "scores (its prototype's products, and its bias if given)" if features else "scores"
    finfo = "np.finfo(dtype).min" if files else "torch.finfo(dtype).min"
    weights = "--cluster-weights" if files else "cluster_weights"
    return (
        f" If cluster {k}'s {what} stand for a mask (a fill such as -1e9 or {finfo}), no sample may go to it and its "
        f"weight cannot be filled: give it weight 0 in {weights}, or allow some sample. Write masks as -inf: otlabel "
        "checks them before solving."
    )


@dataclass
class Problem:
    """A validated balanced-assignment problem.

    ``scores`` is always 3-d ``(H, N, K)`` (a view of the input: no copy); ``batched`` remembers whether
    the caller passed a head dimension, so results come back in the caller's shape. ``has_zero_weights``: whether
    some cluster weight is 0, known on the host (``None``: not known), so that the solver need not ask the device.
    """

    scores: torch.Tensor  # (H, N, K), floating point, finite or -inf
    epsilon: float
    sample_weights: torch.Tensor  # (N,) float64 on scores.device, sums to 1
    cluster_weights: torch.Tensor  # (K,) float64 on scores.device, sums to 1
    batched: bool
    has_zero_weights: bool | None = None
    column_max: torch.Tensor | None = None  # (H, K), where validation computed it: operators need not compute it again
    mass_rounding: float = 0.0  # what the mask check allows for the weights' rounding as given (marginals_rounding)
    summary: ScoreSummary | None = None  # what the checks learnt of the values, for otlabel.advice's warnings

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.scores.shape)


def share_numpy(x: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without its warning for read-only arrays (memmaps opened "r"): otlabel never writes to
    its inputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x)


def as_tensor(x, name: str) -> torch.Tensor:
    """Accept a torch tensor, a NumPy array (no copy), a list of tensors (stacked: one per head) or a (nested) list of
    numbers; reject anything else clearly.

    Tensors are detached: an assignment is a target, not something to differentiate through, and a graph
    recorded over hundreds of iterations would hold every intermediate in memory.
    """
    if isinstance(x, torch.Tensor):
        return dense_tensor(x, name)
    if isinstance(x, np.ndarray):
        x = unmasked_array(x, name)
        refuse_unconvertible_dtype(x, name)
        if x.dtype.kind not in "biufc":  # object, string, date arrays: torch's own error names no fix
            raise TypeError(f"{name} must hold numbers, got a NumPy array of dtype {x.dtype}; convert it with "
                            f"np.asarray({name}, dtype=np.float32).")  # fmt: skip
        if x.dtype.kind in "fc" and x.dtype.itemsize > (8 if x.dtype.kind == "f" else 16):  # torch has no such type
            wanted = "float64" if x.dtype.kind == "f" else "complex128"
            raise TypeError(f"{name} is a NumPy array of dtype {x.dtype.name} (extended precision), which torch cannot "
                            f"hold; convert it with {name}.astype(np.{wanted}).")  # fmt: skip
        if not x.dtype.isnative:  # big-endian data (a file from another machine): torch cannot share it, so copy
            x = x.astype(x.dtype.newbyteorder("="))
        if torch_cannot_share(x):
            x = np.ascontiguousarray(x)
        return share_numpy(x)
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        # One tensor per head (SeLa's heads: [head(z) for head in heads]), stacked where they are. Through NumPy,
        # those that require grad, bfloat16 ones and CUDA ones all failed with torch's own errors.
        if len({(t.shape, t.device) for t in x}) > 1:
            raise ValueError(f"{name} given as a list of tensors (one per head) must have one shape and one device, "
                             f"got {[(tuple(t.shape), str(t.device)) for t in x]}.")  # fmt: skip
        return torch.stack([dense_tensor(t, name) for t in x])
    if isinstance(x, (list, tuple)):
        hidden = hidden_in_list(x)
        if hidden:  # np.asarray reads what they hide
            raise masked_error(name, hidden, "given as a list holds NumPy masked arrays", "np.ma.stack(x)")
        try:
            array = np.asarray(x)
        except ValueError:
            array = None  # ragged nesting
        if array is not None and (array.dtype.kind in "iuf"):
            return torch.from_numpy(array)
        raise TypeError(f"{name} given as a list must be a rectangular list of numbers; convert it with np.asarray.")
    if isinstance(x, (str, os.PathLike)):
        # Streaming reads scores from disk, not weights: pointing weights there sent users to an entry point that
        # refuses their path just the same.
        fix = ("sinkhorn_assign_stream(path) reads it in chunks (or np.load(path, mmap_mode='r'))" if name == "scores"
               else "load it first: np.load(path)")  # fmt: skip
        raise TypeError(
            f"{name} must be a torch.Tensor, a numpy.ndarray or a list of numbers, got the path {os.fspath(x)!r}. "
            f"For a .npy on disk, {fix}."
        )
    raise TypeError(f"{name} must be a torch.Tensor, a numpy.ndarray or a list of numbers, got {type(x).__name__}.")


# The float32 values of bfloat16 bits held as 2-byte raw values (NumPy dtype V2), of a block of them ({rows}): the
# top half of a float32's bits
BFLOAT16_TO_FLOAT32 = "({rows}.view(np.uint16).astype(np.uint32) << 16).view(np.float32)"


def refuse_unconvertible_dtype(x: np.ndarray, name: str, from_path: bool = False, file_advice=None) -> None:
    """Records and 2-byte raw values (bfloat16 as NumPy saves it), which neither torch nor ``x.astype(np.float32)``
    reads: refused with a fix that works. ``from_path``: ``x`` was given as a path (:func:`structured_error`);
    ``file_advice(part)``: for a file, the advice to convert it a block at a time, ``part`` what a block becomes."""
    if x.dtype.names:
        raise structured_error(x, name, from_path)
    if x.dtype.kind == "V" and x.dtype.itemsize == 2:
        convert = (f"Convert with {BFLOAT16_TO_FLOAT32.format(rows='x')}." if file_advice is None
                   else file_advice(BFLOAT16_TO_FLOAT32))  # fmt: skip
        raise raw_bfloat16_error(x, name, convert)


def torch_cannot_share(x: np.ndarray) -> bool:
    """Strides torch refuses to share (``torch.from_numpy``): a reversed view (``x[::-1]``), or a field of packed
    records (``x['score']`` of ``[('id', '<i2'), ('score', '<f4')]``: strides of 6 bytes)."""
    return any(stride < 0 or stride % x.itemsize for stride in x.strides)


def raw_bfloat16_error(x: np.ndarray, name: str, convert: str) -> TypeError:
    """The error for 2-byte raw values (NumPy dtype V2), as NumPy reads a bfloat16 .npy (ml_dtypes saves them so):
    ``x.astype`` cannot convert raw values, so their bits are taken as bfloat16, as a tensor that shares them or
    converted as ``convert`` says."""
    tensor = "that shares their memory, torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)"
    if any(stride < 0 for stride in x.strides):  # a reversed view (x[::-1]), which torch.from_numpy refuses
        tensor = ("of a copy (torch shares no view with a negative stride), "
                  "torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)")  # fmt: skip
    return TypeError(f"{name} has dtype {x.dtype}: 2-byte raw values, as NumPy saves bfloat16 (ml_dtypes), which "
                     f"x.astype cannot convert. If they are bfloat16, pass a bfloat16 tensor {tensor}, or their "
                     f"float32 values. {convert}")  # fmt: skip


def structured_error(x: np.ndarray, name: str, from_path: bool = False, shell: bool = False) -> TypeError:
    """The error for a NumPy array of records (a structured dtype, e.g. ``[('id', '<i8'), ('score', '<f4')]``): its
    2-byte ones are no bfloat16 raw values, and ``x.astype(np.float32)`` fails on any. The fix picks a field: the
    first floating-point one, else the first of numbers, looked for inside nested records too (``x['a']['b']``).
    ``from_path``: ``x`` was given as a ``.npy`` path, where no view can be passed: the field is saved as a file of its
    own. ``shell``: the path was named on a command line (``x`` its memmap), where a Python expression is no answer:
    the message gives a command that saves the field beside the file (:func:`field_command`)."""
    path = _value_field(x.dtype, "f") or _value_field(x.dtype, "biu") or [x.dtype.names[0]]
    index = "".join(f"[{part!r}]" for part in path)
    what = (f"{name} is a NumPy array of records (structured dtype {x.dtype}, fields "
            f"{', '.join(map(repr, x.dtype.names))}), not of numbers: ")  # fmt: skip
    if shell:
        new, command = field_command(x.filename, path, floating=_value_field(x.dtype, "f") is not None,
                                     dtype="float64" if name.startswith("--") else "float32")  # fmt: skip
        return TypeError(f"{what}save the field that holds the values, {' / '.join(map(repr, path))}, as a .npy file "
                         f"of its own, and give that file ({new}) in its place. In a shell: {command}")  # fmt: skip
    if from_path:  # np.save writes a view of a memmap in buffered blocks: the file is not read whole
        field = f"np.load(path, mmap_mode='r'){index}"
        return TypeError(f"{what}save the field that holds the values as a .npy file of its own, np.save('new.npy', "
                         f"{field}), and give that file (np.save('new.npy', {field}.astype(np.float32)) if it holds "
                         "other numbers).")  # fmt: skip
    field = f"x{index}"
    return TypeError(f"{what}pass the field that holds the values, {field} (a view; {field}.astype(np.float32) if it "
                     "holds other numbers).")  # fmt: skip


def field_command(path: str, field: list[str], floating: bool, dtype: str) -> tuple[str, str]:
    """A shell command that saves the field ``field`` (the names leading to it) of the records ``.npy`` at ``path``
    as a file of its own beside it, ``<name>_<field>.npy`` (a name not taken yet), memory-mapped (NumPy writes a view
    a block at a time); converted to ``dtype`` where the field is not ``floating``. Returns the new file and the
    command: this Python's interpreter (which has NumPy) with a ``-c`` program, quoted for a POSIX shell."""
    import json
    import shlex
    import sys

    # a field's name may hold anything ('a/b' would name a folder): in the file's name, only [A-Za-z0-9_.-] are kept
    stem, n = os.path.splitext(path)[0] + "_" + "_".join(re.sub(r"[^A-Za-z0-9_.-]", "_", f) for f in field), 0
    while os.path.exists(new := f"{stem}{f'_{n}' if n else ''}.npy"):
        n += 1
    # JSON strings are Python string literals too, in double quotes: the program then needs no quotes of the shell's
    value = f"np.load({json.dumps(path)}, mmap_mode={json.dumps('r')})" + "".join(f"[{json.dumps(f)}]" for f in field)
    value += "" if floating else f".astype({json.dumps(dtype)})"
    program = f"import numpy as np; np.save({json.dumps(new)}, {value})"
    return new, f"{shlex.quote(sys.executable)} -c {shlex.quote(program)}"


def _value_field(dtype: np.dtype, kinds: str) -> list[str] | None:
    """The names leading to the first field of ``dtype`` (records, nested ones searched in order) whose values are of
    one of the NumPy ``kinds``; None where there is none."""
    for field in dtype.names:
        base = dtype[field].base  # a subarray field's values ('<f4', (K,)) are of its base dtype
        path = _value_field(base, kinds) if base.names else ([] if base.kind in kinds else None)
        if path is not None:
            return [field, *path]
    return None


def hidden_entries(x: np.ma.MaskedArray) -> int:
    """How many entries a NumPy masked array hides (``np.ma.nomask``: none)."""
    return int(np.count_nonzero(np.ma.getmask(x)))


def masked_entries(hidden: int) -> str:
    """``'1 masked entry'``, ``'2 masked entries'``: what a message says of ``hidden`` entries."""
    return f"{hidden:,} masked {'entry' if hidden == 1 else 'entries'}"


def unmasked_array(x: np.ndarray, name: str) -> np.ndarray:
    """``x``, or the data of a NumPy masked array that hides nothing (``np.ma.nomask`` or an all-False mask: every
    value shows, as outputs of that kind are written). One that hides entries is refused: its mask would be dropped
    without a word, the hidden values read as if unmasked."""
    if not isinstance(x, np.ma.MaskedArray):
        return x
    hidden = hidden_entries(x)
    if not hidden:
        return np.ma.getdata(x)  # shares memory (a memmap's data stays a memmap)
    raise masked_error(name, hidden, "is a NumPy masked array", "x")


def hidden_in_list(x: list | tuple) -> int:
    """The entries hidden by the NumPy masked arrays (rows, or single masked values such as ``np.ma.masked``) in the
    list or tuple ``x``, at any depth of nesting: ``np.asarray(x)`` reads them as if unmasked. A list of plain numbers
    is passed over by the types it holds (10,000 lists of 1,000 floats: ~0.2-0.35 s, np.asarray ~0.2 s; item by item,
    1.4 s)."""
    if not any(issubclass(kind, (np.ma.MaskedArray, list, tuple)) for kind in set(map(type, x))):
        return 0
    hidden = 0
    for item in x:
        if isinstance(item, np.ma.MaskedArray):
            hidden += hidden_entries(item)
        elif isinstance(item, (list, tuple)):
            hidden += hidden_in_list(item)
    return hidden


def masked_error(name: str, hidden: int, given: str, masked: str) -> TypeError:
    """The error for ``hidden`` masked entries in ``name``, which ``given`` (``is a NumPy masked array``);
    ``masked``: the expression that makes it one masked array, in the fix."""
    fix = (
        f"{masked}.filled(-np.inf) forbids the masked pairs (-inf marks a sample that may not go to a cluster)"
        if name in ("scores", "logits", "bias")
        else f"{masked}.filled(...) with the values the masked entries should have"
    )
    return TypeError(f"{name} {given} with {masked_entries(hidden)}, whose mask otlabel would ignore: pass a "
                     f"plain array. {fix}; np.asarray(x) keeps the hidden values.")  # fmt: skip


def dense_tensor(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` detached, refused when it holds no values in strided memory: a sparse tensor (torch's own errors were
    pages long, naming no fix) or a meta tensor; a view with its negative bit set (``z.conj().imag``) is resolved,
    as NumPy, used in the checks, cannot read it."""
    if x.is_nested:  # its layout may read strided; torch's error from the first size asked ("Internal error") did not
        pad = (f"{name}.to_padded_tensor(float('-inf')) pads it with forbidden pairs, or solve the parts one by one"
               if name == "scores" else f"pad it ({name}.to_padded_tensor(0.0)) or stack equal parts")  # fmt: skip
        raise TypeError(f"{name} is a nested tensor (parts of different sizes): otlabel takes dense tensors; {pad}.")
    masked_type = getattr(sys.modules.get("torch.masked.maskedtensor.core"), "MaskedTensor", None)
    if masked_type is not None and isinstance(x, masked_type):  # torch's dispatch error named no fix
        fix = ("x.get_data().masked_fill(~x.get_mask(), float('-inf')) forbids the masked pairs"
               if name in ("scores", "bias") else "x.get_data() keeps the hidden values")  # fmt: skip
        raise TypeError(f"{name} is a torch MaskedTensor, whose mask otlabel cannot read: pass a plain tensor; {fix}.")
    if x.layout != torch.strided:
        missing = " (its missing entries read as 0: give forbidden pairs -inf)" if name == "scores" else ""
        raise TypeError(f"{name} is a {str(x.layout).removeprefix('torch.')} tensor: otlabel takes dense tensors. "
                        f"Pass {name}.to_dense(){missing}.")  # fmt: skip
    if x.is_meta:
        raise TypeError(f"{name} is a meta tensor, which holds no values: pass a tensor on the CPU or a GPU.")
    # Only where needed: each is a torch call, which costs a small GPU solve host time even when it changes nothing
    x = x.detach() if x.requires_grad else x
    return x.resolve_neg() if x.is_neg() else x


def one_number(x, name: str, what: str = "one positive number") -> numbers.Real:
    """The real number ``x`` is, or holds in a one-element tensor or array (a scheduled value) of any real dtype, as a
    Python int or float is; anything else is a ``TypeError`` saying that ``name`` must be ``what``."""
    if isinstance(x, torch.Tensor) and x.is_meta:  # .item() raised torch's "cannot be called on meta"
        raise TypeError(f"{name} is a meta tensor, which holds no value: pass a number (or a tensor on a real device).")
    if isinstance(x, torch.Tensor) and x.is_nested:  # numel() raised torch's "Internal error"
        raise TypeError(f"{name} must be {what} (a float, or a one-element tensor or array), got a nested tensor.")
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype != torch.bool:
        x = x.item()  # a complex one stays complex, and is refused below
    elif isinstance(x, np.ndarray) and x.size == 1 and x.dtype.kind in "iuf":
        x = unmasked_array(x, name).item()  # .item() reads a masked array's hidden value (np.ma.masked's as 0.0)
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):  # numbers.Real: NumPy scalars too
        # the dtype too: a one-element bool or complex one read "got Tensor of shape ()", which the message allows
        shape = f" of shape {tuple(x.shape)} and dtype {x.dtype}" if isinstance(x, (torch.Tensor, np.ndarray)) else ""
        raise TypeError(f"{name} must be {what} (a float, or a one-element tensor or array), got "
                        f"{type(x).__name__}{shape}.")  # fmt: skip
    return x


def described(x) -> str:
    """``repr(x)`` for a message refusing ``x`` as a number, but a NumPy masked array said to be one, with what it
    hides: its repr, four lines, shows a hidden value as ``--``."""
    if not isinstance(x, np.ma.MaskedArray):
        return repr(x)
    hidden = hidden_entries(x)
    hides = f"with {masked_entries(hidden)}" if hidden else "that hides nothing"
    return f"a NumPy masked array of shape {x.shape} {hides} (pass a plain number)"


def check_epsilon(epsilon) -> float:
    epsilon = real_as_float(one_number(epsilon, "epsilon"))
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(
            f"epsilon must be a finite number > 0, got {epsilon}. It is the entropic temperature: "
            "0.05 is SwAV's default; smaller is closer to a hard assignment (and needs more iterations)."
        )
    if not math.isfinite(1.0 / epsilon):  # a subnormal eps: 1/eps, a factor of every pass, is inf even in float64
        raise ValueError(
            f"epsilon={epsilon:g} is too small: 1/epsilon overflows to inf. Choose epsilon on the scale of the "
            "scores' differences (0.05 for cosine similarities; smaller is closer to a hard assignment)."
        )
    return epsilon


def real_as_float(x: numbers.Real) -> float:
    """``float(x)``, with a Python int or Fraction beyond float's range (10**400) as the infinity of its sign: its own
    ``OverflowError`` named no argument."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def check_inverse_epsilon(epsilon: float, dtype: torch.dtype) -> None:
    """1/eps scales every pass in the compute dtype: an epsilon whose reciprocal overflows float32 (below ~3e-39,
    possible only when the scores barely differ) is refused there rather than failing inside torch."""
    if 1.0 / epsilon > torch.finfo(dtype).max:
        raise ValueError(
            f"epsilon={epsilon:g} is too small for {arithmetic_name(dtype)} arithmetic: 1/epsilon overflows. Pass "
            "float64 scores, or an epsilon on the scale of the scores' differences."
        )


def float_conversion(x: torch.Tensor, name: str) -> str:
    """How to make the tensor ``x`` floating point, as a sentence: ``.float()``, which a quantized tensor refuses
    (torch's "Creation of quantized tensor requires quantized dtype"), ``.dequantize()`` for that; for a complex
    one, which ``.float()`` would cut to its real part with no more than a warning, the part meant
    (:func:`complex_conversion`)."""
    if x.is_complex():
        magnitude = f"{name}.abs()" + (f" (np.abs({name}) for a NumPy array)" if name == "scores" else "")
        return complex_conversion(name, magnitude, ".float()")
    return f"Convert with {name}.dequantize()." if x.is_quantized else f"Convert with {name}.float()."


def complex_conversion(name: str, magnitude: str, cast: str) -> str:
    """The fix for complex values: a cast (``cast``) keeps the real part alone, with no more than a warning (a
    magnitude, say, would be read as its real part), so the caller says which part is meant: ``name.real`` or the
    ``magnitude``."""
    return f"Pass {name}.real or {magnitude}, whichever you mean: {cast} would keep the real part alone."


def check_float_dtype(x: torch.Tensor, name: str) -> None:
    """A tensor input other than the scores must be floating point: integers are never cast silently."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {x.dtype}. "
                        f"{float_conversion(x, name)}")  # fmt: skip


def check_scores(scores, name: str = "scores") -> tuple[torch.Tensor, bool]:
    """Shape and dtype of the score matrix (called ``name`` in the messages: SeLa's are ``logits``); returns the
    (H, N, K) view and whether it was batched."""
    original, listed = scores, isinstance(scores, (list, tuple))  # no .float() nor .astype(): np.asarray instead
    scores = as_tensor(scores, name)
    if scores.ndim not in (2, 3):  # before the dtype: converting 1-d integers (labels?) to floats leads nowhere
        integers = scores.ndim == 1 and not (scores.dtype.is_floating_point or scores.is_complex()
                                             or scores.dtype == torch.bool)  # fmt: skip
        labels = (f" {len(scores):,} integers look like labels: pass the (N, K) {name} (logits or similarities of "
                  "each sample to each cluster) they would come from.") if integers else ""  # fmt: skip
        raise ValueError(
            f"{name} must have shape (N, K) or (H, N, K) — samples by clusters, optionally with a leading head "
            f"dimension — got shape {tuple(scores.shape)}.{labels}"
        )
    if scores.dtype not in FLOAT_DTYPES:
        fix = float_conversion(scores, name)
        if listed and not scores.is_complex() and all(isinstance(t, torch.Tensor) for t in original):  # per head
            fix = f"Convert each head: [t.float() for t in {name}]."
        elif listed and not scores.is_complex():
            fix = f"Convert the list with np.asarray({name}, dtype=np.float32), or write its numbers as floats."
        elif not scores.is_complex():
            fix = f"{fix[:-1]} (a NumPy array: {name}.astype(np.float32))."
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {scores.dtype}. {fix}"
        )
    if scores.numel() == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(scores.shape)}): "
            "there must be at least one sample, one cluster and one head."
        )
    batched = scores.ndim == 3
    return (scores if batched else scores.unsqueeze(0)), batched


def check_score_values(
    scores: torch.Tensor,
    cluster_weights: torch.Tensor,
    has_zero_weights: bool | None = None,
    epsilon: float | None = None,
    batched: bool = True,
    sample_weights: torch.Tensor | None = None,
    mass_rounding: float = 0.0,
) -> torch.Tensor:
    """NaN, +inf, masks (-inf) that leave a sample or a weighted cluster with nowhere to go, and (given
    ``epsilon``) scores too large for it. Returns the column maxima (H, K) it computed on the way (the CPU operator
    starts from them: a pass over the scores, 18 ms at 100,000 x 1,000, not made twice); :func:`judge_score_values`
    returns the extremes it judged as well.

    Two max-reductions over the scores do the checking (a max propagates NaN and +inf, and is -inf only where a whole
    row or column is masked), a third when some weight is 0 (the row maxima over the clusters with weight); on the CPU
    the two and the smallest score come from one read of float32 scores (:func:`torch_backend.score_maxima`); the
    extremes of their results come back to the host together and are judged there (see :func:`score_extremes`): one
    device synchronisation (two when some weight is 0; ``has_zero_weights=None`` reads that from the device,
    :func:`validate` knows it from its host copy of the weights). Few operations, too:
    on a GPU each costs ~10-25 us of host time, as much as the reductions themselves at a SwAV batch's size.
    ``batched=False``: the caller passed (N, K) scores, and indices are given so. The slow search for where the
    problem is runs only on failure, and says what it found.

    Given ``sample_weights``, a mask that no balanced plan can respect (Hall's condition: some samples may only go to
    clusters too light for them, see :mod:`otlabel.feasibility`) is an error too: the smallest score comes back in
    the same transfer, and only when it is -inf are the masked rows read and the condition decided, allowing a
    shortfall of ``mass_rounding`` (:func:`weight_rounding`) for the rounding of the weights as given.
    """
    return judge_score_values(scores, cluster_weights, has_zero_weights, epsilon, batched, sample_weights,
                              mass_rounding)[0]  # fmt: skip


def judge_score_values(scores, cluster_weights, has_zero_weights=None, epsilon=None, batched=True, sample_weights=None,
                       mass_rounding=0.0) -> tuple[torch.Tensor, ScoreExtremes]:  # fmt: skip
    """:func:`check_score_values`, returning the column maxima and the :class:`ScoreExtremes` it judged (with the
    smallest score where ``sample_weights`` are given)."""
    from .backends import torch_backend  # (a cycle at import time)

    # (H, N), (H, K) and the smallest score: in one read where it applies (CPU float32), else by torch
    row_max, col_max, lowest = torch_backend.score_maxima(scores) or (scores.amax(dim=2), column_max(scores), None)
    if sample_weights is None:  # no mask check without them
        lowest = None
    elif lowest is None:
        lowest = scores.amin()
    if has_zero_weights is None:
        has_zero_weights = bool((cluster_weights == 0).any())
    weighted_row_max, weighted_col_max = row_max, col_max  # over the clusters with weight: the ones the solve involves
    if has_zero_weights:
        positive = cluster_weights > 0
        weighted_row_max = scores[:, :, positive].amax(dim=2)
        weighted_col_max = torch.where(positive, col_max, 0.0)
    extremes = score_extremes(row_max, col_max, weighted_row_max, weighted_col_max, has_zero_weights, lowest)
    if not extremes.acceptable_for(scores, epsilon):
        raise_for_bad_values(cluster_weights, row_max, col_max, weighted_row_max, scores, epsilon, batched)
    if extremes.masked:
        from .feasibility import check_dense_mask

        check_dense_mask(scores, sample_weights, cluster_weights, batched, mass_rounding)
    return col_max, extremes


@dataclass
class ScoreExtremes:
    """The extremes of the scores' row and column maxima, on the host: what :func:`check_score_values` judges.

    ``rows``: (min, max) of the row maxima (NaN if any score is NaN); ``weighted_rows`` and ``weighted_cols``:
    (min, max) of the row maxima over the clusters with weight and of those clusters' column maxima (zero-weight
    clusters counted as 0); ``top``: the largest column maximum of any cluster.
    """

    rows: tuple[float, float]
    weighted_rows: tuple[float, float]
    weighted_cols: tuple[float, float]
    top: float
    masked: bool = False  # some score is -inf (known only when the smallest score was read back)
    lowest: float | None = None  # the smallest score, where it was read back (a zero without its sign)

    def acceptable(self, max_span: float, overflow: float, epsilon: float | None) -> bool:
        """Whether :func:`raise_for_bad_values` finds nothing to say: the same verdicts, from the extremes.

        Once every row maximum is finite (no NaN, no +inf, no sample masked everywhere), a -inf minimum is a
        masked row or column, and the largest |maximum| is the largest finite one: the span of
        :func:`score_span`, and ``top`` is :func:`largest_finite` of the column maxima."""
        if not all(math.isfinite(x) for x in self.rows):
            return False
        if self.weighted_rows[0] == -math.inf or self.weighted_cols[0] == -math.inf:
            return False  # a sample allowed only in zero-weight clusters, a weighted cluster no sample may reach
        if epsilon is None:
            return True
        span = max(-self.weighted_rows[0], self.weighted_rows[1], -self.weighted_cols[0], self.weighted_cols[1])
        return not (span > max_span * epsilon or self.top > overflow * epsilon)

    def acceptable_for(self, scores: torch.Tensor, epsilon: float | None) -> bool:
        """:meth:`acceptable` with the limits of these scores' dtype."""
        return self.acceptable(max_score_span(compute_dtype_of(scores)), overflow_span(scores), epsilon)


def score_extremes(row_max, col_max, weighted_row_max, weighted_col_max, has_zero_weights: bool,
                   lowest: torch.Tensor | None = None) -> ScoreExtremes:  # fmt: skip
    """:class:`ScoreExtremes` of the row and column maxima (and the smallest score, if given), read back in one
    transfer. Without zero weights the weighted maxima are the maxima themselves, and their extremes are not computed
    twice."""
    parts = [*aminmax(row_max), *aminmax(weighted_col_max)]
    if has_zero_weights:
        parts += [*aminmax(weighted_row_max), col_max.amax()]
    if lowest is not None:  # (the conversion only where needed: even a no-op .to() costs a GPU call some host time)
        parts.append(lowest if lowest.dtype == parts[0].dtype else lowest.to(parts[0].dtype))
    values = torch.stack(parts).tolist()
    smallest = None if lowest is None else values.pop() + 0.0  # (+0.0: either zero reads as +0)
    extremes = extremes_from_values(values)
    # (set in place: dataclasses.replace would copy it, a few us of a small solve's ~400)
    extremes.masked, extremes.lowest = smallest == -math.inf, smallest
    return extremes


def extremes_on_device(scores: torch.Tensor) -> torch.Tensor:
    """(4,) the extremes :func:`check_score_values` judges when no cluster weight is 0, left on the device: a
    captured solve (:mod:`otlabel.graphs`) computes them in its graph and reads them with its results."""
    return torch.stack([*aminmax(scores.amax(dim=2)), *aminmax(scores.amax(dim=1))])


def extremes_from_values(values: list[float]) -> ScoreExtremes:
    """:class:`ScoreExtremes` from the 4 values of :func:`extremes_on_device` (no zero weights: the weighted
    maxima are the maxima) or the 7 of :func:`score_extremes` with zero weights."""
    rows_lo, rows_hi, cols_lo, cols_hi, *rest = values
    weighted_rows_lo, weighted_rows_hi, top = rest if rest else (rows_lo, rows_hi, cols_hi)
    return ScoreExtremes((rows_lo, rows_hi), (weighted_rows_lo, weighted_rows_hi), (cols_lo, cols_hi), top)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the solver's passes form ``S / eps + b`` in: float64 for float64 scores, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_arithmetic(backend) -> torch.dtype | None:
    """float64 for the reference backend, the specification, which computes in it whatever the scores' dtype (their
    span is judged for float64); ``None`` for the others, which compute in the scores' own precision."""
    return torch.float64 if isinstance(backend, str) and backend == "reference" else None


def compute_dtype_of(scores: torch.Tensor) -> torch.dtype:
    return compute_dtype(scores.dtype)


def _cpu_half_aminmax_works() -> bool:
    try:
        torch.aminmax(torch.zeros(1, dtype=torch.float16))
    except RuntimeError:  # torch 2.1: "aminmax_cpu" not implemented for 'Half'
        return False
    return True


CPU_HALF_AMINMAX = _cpu_half_aminmax_works()


def aminmax(t: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.aminmax``; a float16 CPU tensor through float32 where torch has no float16 kernel for it (2.1): the
    same values, as both are exact."""
    if not CPU_HALF_AMINMAX and t.dtype == torch.float16 and t.device.type == "cpu":
        low, high = torch.aminmax(t.float(), **kwargs)
        return low.half(), high.half()
    return torch.aminmax(t, **kwargs)


AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hpu", "mtia")  # where torch.autocast has a mode to turn off


def _autocast_takes_a_device_type() -> bool:
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4: is_autocast_enabled() takes no argument and answers for CUDA only
        return False
    return True


if _autocast_takes_a_device_type():

    def is_autocast_enabled(device_type: str) -> bool:
        return torch.is_autocast_enabled(device_type)

else:  # torch < 2.4: one function per device type, and only the CPU's and CUDA's autocast built in
    _LEGACY_AUTOCAST_CHECKS = {"cpu": torch.is_autocast_cpu_enabled, "cuda": torch.is_autocast_enabled}

    def is_autocast_enabled(device_type: str) -> bool:
        check = _LEGACY_AUTOCAST_CHECKS.get(device_type)
        return check is not None and check()


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)  # torch's one call for many device types (private)


def _unseen_by_any_autocast() -> tuple[str, ...] | None:
    """The device types of ``AUTOCAST_DEVICE_TYPES`` whose autocast ``torch._C._is_any_autocast_enabled`` does not
    see (torch 2.13: MPS), found by turning each on for a moment; None where torch lacks that call or autocast by
    device type (< 2.4), or where some autocast is on already (otlabel imported inside a region)."""
    if _ANY_AUTOCAST is None or not _autocast_takes_a_device_type() or _ANY_AUTOCAST():
        return None
    unseen = []
    for device_type in AUTOCAST_DEVICE_TYPES:
        try:
            torch.set_autocast_enabled(device_type, True)
        except (RuntimeError, TypeError, ValueError):  # not one this torch knows: asked by name, as before
            unseen.append(device_type)
            continue
        try:
            if not _ANY_AUTOCAST():
                unseen.append(device_type)
        finally:
            torch.set_autocast_enabled(device_type, False)
    return tuple(unseen)


_UNSEEN_BY_ANY_AUTOCAST = _unseen_by_any_autocast()


def any_autocast_enabled() -> bool:
    """Whether :func:`autocast_off` has anything to turn off on this thread (or, rarely, autocast is on only for a
    device type it leaves alone: then it enters nothing). Asked before every pass: one call of torch's and the device
    types it does not see, 0.5 us, where the six device types one by one took 2.5 us."""
    if _UNSEEN_BY_ANY_AUTOCAST is not None:
        return _ANY_AUTOCAST() or any(is_autocast_enabled(device_type) for device_type in _UNSEEN_BY_ANY_AUTOCAST)
    return any(is_autocast_enabled(device_type) for device_type in AUTOCAST_DEVICE_TYPES)


@contextmanager
def autocast_off():
    """Context: ``torch.autocast`` off for every device type where the caller turned it on. otlabel's own matrix
    products (the passes' ``bmm`` and ``baddbmm``, the mask check's sums) are float32 by design, and a caller's
    autocast region (a training step under AMP) would run them in bfloat16/float16 on its own thread: column sums off
    by ~3e-3, and masks left unchecked. Only the enabled ones are entered: this runs once per pass."""
    with ExitStack() as stack:
        for device_type in AUTOCAST_DEVICE_TYPES:
            if is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def score_span(row_max: torch.Tensor, col_max: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-d: the largest finite |row maximum| or |column maximum| (of clusters with weight) of the scores, the size
    of ``S / eps`` and of the potentials, times ``eps``. Zero-weight clusters take no part in the solve."""
    cols = torch.where(positive, col_max, 0.0)
    return torch.stack([_finite_abs_max(row_max), _finite_abs_max(cols)]).amax()


def largest_finite(x: torch.Tensor) -> torch.Tensor:
    """0-d float64: the largest finite entry (-inf when there is none)."""
    return torch.where(torch.isfinite(x), x, float("-inf")).amax().double()


def overflow_span(scores: torch.Tensor) -> float:
    """A bound on ``|S| / eps`` that keeps ``S / eps + b`` finite in the compute precision, with room to spare."""
    return torch.finfo(compute_dtype_of(scores)).max * 1e-3


def _finite_abs_max(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x.abs(), 0).amax().double()


def index_in_input(idx: tuple, batched: bool) -> str:
    """An (h, j, k) index of the 3-d view, in the layout the caller passed: (j, k) of (N, K) scores."""
    return f"{idx} of the (H, N, K) scores" if batched else f"{idx[1:]} of the (N, K) scores"


def raise_for_bad_values(cluster_weights, row_max, col_max, weighted_row_max, scores, epsilon=None,
                         batched=True) -> None:  # fmt: skip
    """Find the first bad entry or mask and raise the error that names it (the failure path: may be slow).
    ``weighted_row_max`` is the row maxima over the clusters with weight (``row_max`` itself when all have one)."""
    if not bool(torch.isfinite(row_max).all()):
        if torch.isnan(row_max).any():
            idx = _first_index(torch.isnan(scores))
            raise ValueError(
                f"scores contain NaN (first at index {index_in_input(idx, batched)}). Fix the model output."
            )
        if torch.isposinf(row_max).any():
            idx = _first_index(torch.isposinf(scores))
            raise ValueError(
                f"scores contain +inf (first at index {index_in_input(idx, batched)}). Only -inf is allowed, and it "
                "means 'this sample may not go to this cluster'."
            )
        h, j = _first_index(torch.isneginf(row_max))
        raise masked_sample_error(j, h)
    stranded = torch.isneginf(weighted_row_max)  # (H, N): allowed only in clusters of weight 0
    if bool(stranded.any()):
        h, j = _first_index(stranded)
        raise stranded_sample_error(j, h)
    raise_for_starved_clusters(col_max, cluster_weights)
    span = float(score_span(weighted_row_max, col_max, cluster_weights > 0))
    dtype = compute_dtype_of(scores)
    limit = None if epsilon is None else max_score_span(dtype) * epsilon
    if limit is not None and span > limit:
        # A cluster whose best score is itself too large for epsilon, far below the rest: maybe a mask fill, said so
        # (not one that is merely far below a huge score elsewhere, which the span error names)
        far_below = below_the_rest(col_max, cluster_weights, limit) & (col_max.abs() > limit)  # (H, K)
        if bool(far_below.any()):
            h, k = _first_index(far_below)
            raise far_cluster_error(k, h, float(col_max[h, k]), epsilon, dtype)
        raise span_error(span / epsilon, dtype, f" (|scores| up to {span:.3g}, epsilon {epsilon:.3g})")
    top = float(largest_finite(col_max))
    if epsilon is not None and top > overflow_span(scores) * epsilon:
        raise ValueError(
            f"scores / epsilon reach {top / epsilon:.3g} in a cluster of weight 0, where S / eps overflows "
            f"{arithmetic_name(dtype)}. That cluster receives nothing whatever its scores: give it -inf, or "
            "any moderate value."
        )


def masked_sample_error(j: int, h: int, where: str = "") -> ValueError:
    return ValueError(
        f"infeasible mask: sample {j} (head {h}){where} has every score -inf, so it cannot go to any cluster. "
        "Allow at least one cluster per sample, or drop the sample."
    )


def stranded_sample_error(j: int, h: int, where: str = "") -> ValueError:
    """A sample whose scores are -inf for every cluster of positive weight. Refused whatever its own weight: of weight
    0 it carries no mass, but its label and codes are read over the clusters of positive weight alone (``S / eps +
    b`` with ``b = -inf`` at weight 0), so there it would get codes of NaN (0 / 0) and a forbidden label (as the
    reference backend gave it; the torch backend's potentials turned NaN); the exact solvers refuse it alike."""
    return ValueError(
        f"infeasible mask: sample {j} (head {h}){where} is allowed only in clusters of weight 0, which take no mass. "
        "With a positive sample weight it has no plan; with sample weight 0 it has no label or codes either, as "
        "those are read over the clusters of positive weight (the argmax and softmax of S / eps + b, b = -inf where "
        "the weight is 0). Allow it in a cluster with positive weight, or drop the sample."
    )


def raise_for_starved_clusters(col_max: torch.Tensor, cluster_weights: torch.Tensor) -> None:
    """A cluster of positive weight that no sample may reach (its column maximum, (H, K), is -inf) is infeasible."""
    starved = torch.isneginf(col_max) & (cluster_weights > 0)
    if bool(starved.any()):
        h, k = _first_index(starved)
        raise ValueError(
            f"infeasible mask: cluster {k} (head {h}) has weight {float(cluster_weights[k]):.3g} > 0 but every "
            "sample's score for it is -inf, so its share cannot be filled. Allow some sample, or give it weight 0."
        )


def weighted_clusters(cluster_weights: torch.Tensor) -> torch.Tensor | None:
    """The indices of the clusters of positive weight for :func:`check_rows`, or None when every cluster has weight
    (found once per solve: on a GPU each such question is a synchronisation)."""
    weighted = cluster_weights > 0
    return None if bool(weighted.all()) else torch.nonzero(weighted)[:, 0]


def check_rows(
    scores: torch.Tensor,
    weighted: torch.Tensor | None,
    offset: int = 0,
    where: str = "",
    inv_eps: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
    batched: bool = True,
    from_features: bool = False,
    features: torch.Tensor | None = None,
    epsilon: float | None = None,
    given_rows=None,
    extremes: list | None = None,
) -> torch.Tensor | None:
    """The per-sample checks of :func:`otlabel.problem.check_score_values` on a chunk ``(H, T, K)`` whose first
    sample is sample ``offset``: NaN, +inf, samples with nowhere to go, and (given ``inv_eps``: 1 when the chunk
    is ``S / eps`` already) ``|S| / eps`` beyond what ``compute_dtype`` resolves
    (:func:`~otlabel.problem.max_score_span`), over the clusters with weight (``weighted``, from
    :func:`weighted_clusters`): the others take no part in the solve. (The per-cluster checks need every sample:
    :func:`check_columns` on the accumulated column maxima.)

    Returns the (H, T) flags of the samples with a -inf score for a weighted cluster (the rows whose masks Hall's
    condition must see: :func:`~otlabel.feasibility.collect_masks`), or None when there are none. The verdict and
    that answer come back from the device in one read: one synchronisation per chunk on a GPU. ``features``: the
    (N, D) features the scores came from, read on failure only, to tell a bad row from scores that overflow;
    ``epsilon``: the solve's, for a span error to say the scores' size and the temperature (as the dense check does);
    ``given_rows``: for a chunk of ``S / eps``, a function returning the chunk's scores as given (read on failure only),
    to tell a +inf given from finite scores whose quotient by epsilon overflows; ``extremes``: a list that receives,
    read in the same transfer, the smallest and largest row minimum and row maximum over the weighted clusters, in the
    chunk's units (for :func:`otlabel.advice.block_summary`)."""
    span_limit = math.inf if not inv_eps else max_score_span(compute_dtype) / inv_eps  # in the chunk's units
    in_weighted = scores if weighted is None else scores.index_select(2, weighted)
    weighted_row_min, weighted_row_max = aminmax(in_weighted, dim=2)  # (H, T): NaN and +inf propagate
    row_max = weighted_row_max if weighted is None else scores.amax(dim=2)  # -inf only for a masked row
    good = (torch.isfinite(weighted_row_max) & (weighted_row_max.abs() <= span_limit)).all()
    masked = torch.isneginf(weighted_row_min)
    verdicts = [good & torch.isfinite(row_max).all(), masked.any()]
    if extremes is not None:
        verdicts = [v.to(scores.dtype) for v in verdicts] + [*aminmax(weighted_row_min), *aminmax(weighted_row_max)]
    good, any_masked, *values = torch.stack(verdicts).tolist()
    if extremes is not None:
        extremes[:] = values
    if not good:
        raise_for_bad_rows(scores, row_max, weighted_row_max, offset, where, inv_eps, compute_dtype, batched,
                           from_features, features, epsilon, given_rows, weighted)  # fmt: skip
    return masked if any_masked else None


def overflow_span_error(given: float, index: tuple, where: str, epsilon: float, compute_dtype) -> ScoreSpanError:
    """The span error for a finite score ``given`` (at ``index``) whose quotient by ``epsilon`` overflowed to +-inf:
    too large for the temperature, not a +inf or a mask."""
    detail = f" (a score of {given:.3g} at index {index}{where}, epsilon {epsilon:.3g})"
    return span_error(abs(given) / epsilon, compute_dtype, detail)


def raise_for_bad_rows(scores, row_max, weighted_row_max, offset, where, inv_eps, compute_dtype, batched,
                       from_features=False, features=None, epsilon=None, given_rows=None,
                       weighted=None) -> None:  # fmt: skip
    """The failure path of :func:`check_rows`: the error that names the first bad sample (``batched=False``:
    indices of (N, K) scores, as the caller passed them; ``from_features``: the scores are Z C^T + bias, whose
    prototypes and bias were checked, so a NaN or inf comes from a row of the ``features`` or from products
    that overflow; ``weighted``: the clusters with weight, as :func:`check_rows` takes them)."""
    if torch.isnan(row_max).any():
        h, j, k = _first_index(torch.isnan(scores))
        if from_features:
            raise bad_features_row_error(j + offset, where, features, compute_dtype, math.nan)
        index = index_in_input((h, j + offset, k), batched)
        raise ValueError(f"scores contain NaN (first at index {index}{where}). Fix the model output.")
    # Prototypes finite, bias checked (no -inf on a weighted cluster): an inf, or a row -inf on every weighted
    # cluster, comes from a features row or from products that overflow, never from a mask
    if from_features and (torch.isinf(row_max).any() or torch.isneginf(weighted_row_max).any()):
        h, j = _first_index(torch.isinf(row_max) | torch.isneginf(weighted_row_max))
        value = float(row_max[h, j]) if math.isinf(row_max[h, j]) else -math.inf  # the row's inf, or its weighted -inf
        raise bad_features_row_error(j + offset, where, features, compute_dtype, value)
    if torch.isposinf(row_max).any():
        h, j, k = _first_index(torch.isposinf(scores))
        index = index_in_input((h, j + offset, k), batched)
        given = math.inf if given_rows is None else float(given_rows()[h, j, k])
        if math.isfinite(given) and epsilon is not None:  # finite as given: S / eps overflowed, the span error's case
            raise overflow_span_error(given, index, where, epsilon, compute_dtype)
        raise ValueError(
            f"scores contain +inf, or scores / epsilon overflow (first at index {index}{where}). "
            "Only -inf is allowed, and it means 'this sample may not go to this cluster'."
        )
    for flags, error in ((torch.isneginf(row_max), masked_sample_error),
                         (torch.isneginf(weighted_row_max), stranded_sample_error)):  # fmt: skip
        if flags.any():
            h, j = _first_index(flags)
            if given_rows is not None and epsilon is not None:  # -inf as S / eps: finite as given, -3e38 / 0.05?
                given = given_rows()[h, j]  # (K,)
                finite = torch.isfinite(given)  # where the row's -inf is an overflow, not a mask
                involved = finite  # ... in a cluster the solve involves: the span error
                if weighted is not None:
                    involved = finite & torch.zeros_like(finite).index_fill_(0, weighted, True)
                if bool(involved.any()):
                    k = int(torch.nonzero(involved)[0])
                    index = index_in_input((h, j + offset, k), batched)
                    raise overflow_span_error(float(given[k]), index, where, epsilon, compute_dtype)
                if bool(finite.any()):  # finite in clusters of weight 0 only: not masked there, as in memory
                    error = stranded_sample_error
            raise error(j + offset, h, where)
    span_over_eps = float(weighted_row_max.abs().amax()) * inv_eps
    detail = where
    if epsilon is not None:  # the chunk may be S / eps already (inv_eps 1): the size of S from the solve's epsilon
        detail += f" (|scores| up to {span_over_eps * epsilon:.3g}, epsilon {epsilon:.3g})"
    raise span_error(span_over_eps, compute_dtype, detail, features=from_features)


def bad_features_row_error(row: int, where: str, features: torch.Tensor | None, compute_dtype,
                           value: float) -> ValueError:  # fmt: skip
    """A features row whose scores are NaN or inf (the prototypes and bias are finite): the row itself holds NaN or
    inf, or, finite, its products with the prototypes overflow (features and prototypes of 1e20: 1e40 is beyond
    float32), which no fix of the row's values as such would cure. ``value``: the row's NaN or infinite score."""
    if features is not None and bool(torch.isfinite(features[row]).all()):
        return ValueError(
            f"the scores of features row {row}{where}, features @ prototypes.T (+ bias) divided by epsilon, overflow "
            f"{arithmetic_name(compute_dtype)} arithmetic (to NaN or inf), though the features and prototypes "
            "themselves are finite. L2-normalise the features and the prototypes (cosine scores, as SwAV does)"
            + (", or pass float64 features (computed in float64)." if compute_dtype != torch.float64 else ".")
        )
    shown = "NaN" if math.isnan(value) else f"{value:g}"
    return ValueError(f"features row {row}{where} contains NaN or inf (its scores are {shown}). Fix the features.")


def check_columns(col_max: torch.Tensor, cluster_weights: torch.Tensor, compute_dtype: torch.dtype,
                  from_features: bool = False, epsilon: float | None = None, given_col_max=None) -> None:  # fmt: skip
    """The per-cluster checks on the column maxima of ``S / eps`` (H, K) over all the samples: a cluster of positive
    weight that no sample may reach (its maximum is -inf) is infeasible; one whose best ``|S| / eps`` is beyond
    :func:`~otlabel.problem.max_score_span` needs a potential that ``compute_dtype`` cannot resolve.
    ``from_features``: the scores are features @ prototypes.T + bias, and the fixes are said for those; ``epsilon``:
    the solve's, for the message to say the cluster's best score and the temperature; ``given_col_max``: a function
    returning the column maxima of the scores as given (H, K), read on failure only, to tell a cluster masked by -inf
    from one whose finite best score (-3.4e38, a mask fill?) overflowed to -inf when divided by ``epsilon``."""
    starved = torch.isneginf(col_max) & (cluster_weights > 0)
    if given_col_max is not None and epsilon is not None and bool(starved.any()):
        given = given_col_max().to(col_max.device)
        overflowed = starved & torch.isfinite(given)
        if bool(overflowed.any()):
            h, k = _first_index(overflowed)
            raise far_cluster_error(k, h, float(given[h, k]), epsilon, compute_dtype, from_features)
    raise_for_starved_clusters(col_max, cluster_weights)
    far = (cluster_weights > 0) & torch.isfinite(col_max) & (col_max.abs() > max_score_span(compute_dtype))
    if bool(far.any()):
        h, k = _first_index(far)
        far_over_eps = float(col_max[h, k])
        if epsilon is not None:
            below = bool(below_the_rest(col_max, cluster_weights, max_score_span(compute_dtype))[h, k])
            raise far_cluster_error(k, h, far_over_eps * epsilon, epsilon, compute_dtype, from_features, below)
        raise span_error(abs(far_over_eps), compute_dtype, f" (cluster {k}, head {h})", features=from_features)


def below_the_rest(col_max: torch.Tensor, cluster_weights: torch.Tensor, span: float) -> torch.Tensor:
    """(H, K): the weighted clusters whose best score (``col_max``) is more than ``span`` below the best weighted
    cluster's of their head. Scores all far below 0 alike (-||x - c||^2, logits offset by -1000) have none."""
    weighted = cluster_weights > 0
    best = torch.where(weighted, col_max, -math.inf).amax(dim=-1, keepdim=True)  # (H, 1)
    return weighted & (col_max < best - span)


def far_cluster_error(k: int, h: int, best: float, epsilon: float, compute_dtype: torch.dtype,
                      features: bool = False, below_rest: bool = True) -> ScoreSpanError:  # fmt: skip
    """The span error for weighted cluster ``k`` (head ``h``) whose best score ``best`` is too large for ``epsilon``;
    far below the rest (``below_rest``, not where every cluster is as low), with :func:`mask_fill_note`."""
    detail = f" (cluster {k}, head {h}: its best score {best:.3g}, epsilon {epsilon:.3g})"
    closed = k if best < 0 and below_rest else None
    return span_error(abs(best) / epsilon, compute_dtype, detail, features=features, closed=closed)


def check_weights(weights, size: int, name: str, other: str, device: torch.device, scores_shape=None,
                  transpose_fix: str = TRANSPOSE_FIX) -> torch.Tensor:  # fmt: skip
    """A marginal: 1-d, non-negative, finite, summing to 1. ``None`` gives the uniform weights."""
    if weights is None:  # made once per size and device (a small solve is bound by its count of torch operations)
        return uniform_weights(size, device)
    return checked_host_weights(weights, size, name, other, scores_shape, transpose_fix).to(device=device)


def transposed_hint(length: int, size: int, scores_shape: tuple[int, int] | None,
                    fix: str = TRANSPOSE_FIX) -> str:  # fmt: skip
    """For weights of the wrong length: when that length is the scores' other dimension, the likely cause —
    scores passed as (K, N), clusters by samples (``prototypes @ features.T``). A solve with N < K is legitimate
    (SwAV's small batches), so this is said only inside an error that has already been raised."""
    if scores_shape is None or length == size or length not in scores_shape:
        return ""
    n, k = scores_shape
    return (
        f" {length} is the scores' {'number of samples N' if length == n else 'number of clusters K'}: are the "
        f"scores transposed? They must be samples by clusters, (N, K), and these are read as N = {n} samples by "
        f"K = {k} clusters; {fix}."
    )


def weight_sum_tolerance(dtype: torch.dtype, size: int) -> tuple[float, float]:
    """How far from 1 the sum of ``size`` weights of that dtype may be, as (relative part, subnormal part).

    fp16 weights such as 1/7 cannot sum to 1 within 1e-4: one unit of rounding of the dtype they came in is
    allowed, plus the coarser absolute rounding of subnormal entries (uniform fp16 weights for K = 100,000 sum to
    1.0014). Two parts, so that shards can combine theirs: the largest relative part plus the subnormal parts' sum.
    """
    unit, subnormal = rounding_parts(torch.finfo(dtype if dtype.is_floating_point else torch.float64), size)
    return max(WEIGHT_SUM_RTOL, unit), subnormal


def rounding_parts(info, size: int) -> tuple[float, float]:
    """One unit of rounding of a dtype (its ``finfo``, torch's or NumPy's), and the absolute rounding of ``size``
    subnormal entries (their spacing, ``tiny * eps``, each)."""
    return float(info.eps), size * float(info.tiny) * float(info.eps)


def weight_rounding(weights, size: int) -> float:
    """How much of the mass rounding ``size`` weights to the dtype they were given in may have moved between any
    two sets of samples or clusters: one unit of rounding of that dtype (each weight, and the total they are
    divided by, off by half a unit at most), plus the absolute rounding of subnormal entries. 0 for ``None`` (the
    uniform weights are made in float64) and for weights given as integers or Python numbers (read as float64).

    The mask check (:mod:`otlabel.feasibility`) allows a shortfall this large: float32 cluster weights [3/7, 4/7]
    round 4/7 up (0.571428597, 0.57142858 of their float32 total), which the 4 of 7 samples that may go there
    (0.571428571) cannot fill, by 1e-8."""
    dtype = getattr(weights, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return sum(rounding_parts(torch.finfo(dtype), size))
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        return sum(rounding_parts(np.finfo(dtype), size))
    return 0.0


def marginals_rounding(cluster_weights, sample_weights, k: int, n: int) -> float:
    """:func:`weight_rounding` of both marginals as given (K cluster weights, N sample weights), added up: what the
    mask check allows."""
    return weight_rounding(cluster_weights, k) + weight_rounding(sample_weights, n)


def checked_host_weights(weights, size: int, name: str, other: str, scores_shape=None,
                         transpose_fix: str = TRANSPOSE_FIX) -> torch.Tensor:  # fmt: skip
    """:func:`check_weights` for given weights, returned as a float64 CPU tensor rescaled to sum to exactly 1.
    ``scores_shape``: the scores' (N, K), for a hint when the length given is the other dimension's."""
    from_numpy = isinstance(weights, np.ndarray)
    weights = as_tensor(weights, name)
    refuse_bool_weights(weights, name, from_numpy)
    if weights.is_complex():  # the cast below would drop the imaginary parts with only torch's warning
        raise TypeError(f"{name} must be real proportions, got complex values ({weights.dtype}); pass their real "
                        "part if that is what you mean (w.real).")  # fmt: skip
    if not weights.dtype.is_floating_point:
        weights = weights.double()
    sum_rtol = sum(weight_sum_tolerance(weights.dtype, size))
    if weights.shape != (size,):
        hint = transposed_hint(weights.shape[0], size, scores_shape, transpose_fix) if weights.ndim == 1 else ""
        if hint:  # the other dimension's length: transposed scores, or the other marginal given here (priors as
            # sample_weights): the message named only the first, and sent a user with right scores to transpose them
            mine, theirs = ("sample", "cluster") if "sample" in name else ("cluster", "sample")
            swapped, whose = name.replace(mine, theirs), f"{theirs}s'"
            hint += f" Or, if these are the {whose} shares, pass them as {swapped}."
        if weights.ndim == 2 and weights.shape[1] == size:  # (H, K) or (H, N): weights per head
            hint = (" The heads of batched (H, N, K) scores share one weight vector; for weights per head, solve each "
                    "head on its own (scores[h]).")  # fmt: skip
        raise ValueError(
            f"{name} must have shape ({size},) to match the {other} of scores, got {tuple(weights.shape)}.{hint}"
        )
    host = weights.to(device="cpu", dtype=torch.float64).numpy()  # checked on the host: one transfer, no more syncs
    if not np.isfinite(host).all():
        raise ValueError(f"{name} contain NaN or inf; they must be finite proportions.")
    if (host < 0).any():
        k = int(np.flatnonzero(host < 0)[0])
        raise ValueError(f"{name} must be non-negative, but entry {k} is {host[k]:.6g}.")
    total = float(host.sum())
    if total == 0.0:  # (w / w.sum() would be NaN)
        raise ValueError(f"{name} must sum to 1, but every one of them is 0: give some a positive share.")
    if abs(total - 1.0) > sum_rtol:
        raise ValueError(
            f"{name} must sum to 1, got a sum of {total:.6g}. Pass proportions, e.g. w / w.sum() for counts."
        )
    # Exactly 1 in float64: both marginals must carry the same mass, or no plan meets them and the solver would
    # chase the difference (a sum of 0.9999 against 1.0001 stalled at error 2e-4).
    return torch.from_numpy(host / total)


def refuse_bool_weights(weights: torch.Tensor, name: str, from_numpy: bool = False) -> None:
    """Boolean weights (a mask) would read as 1 and 0, an equal share for every True entry, which may or may not
    be what was meant; the same values as a list are refused, so a bool tensor or array is too."""
    if weights.dtype != torch.bool:
        return
    if name.startswith("--"):  # a command-line file: the fix is a file saved anew
        fix = "save the file anew as floats: np.save(path, w.astype(np.float64) / w.sum())"
    elif from_numpy:
        fix = f"e.g. {name}=mask.astype(np.float64) / mask.sum() for equal shares among the True entries"
    else:
        fix = f"e.g. {name}=mask.float() / mask.sum() for equal shares among the True entries"
    raise TypeError(f"{name} is boolean (True/False), not proportions: pass floating-point weights, {fix}.")


def validate(scores, epsilon, cluster_weights=None, sample_weights=None, check_values: bool = True,
             arithmetic: torch.dtype | None = None) -> Problem:  # fmt: skip
    """Check everything once; the returned problem is safe for every backend. ``check_values=False`` leaves out the
    pass over the score values (NaN, +inf, masks, span): a captured solve makes it in its graph, then judges it.
    ``arithmetic``: the dtype the solve computes in where it is not the scores' own (the reference backend's
    float64): the scores are converted first, and their span is judged for that precision."""
    epsilon = check_epsilon(epsilon)
    scores3, batched = check_scores(scores)
    if arithmetic is not None:
        scores3 = scores3.to(arithmetic)
    check_inverse_epsilon(epsilon, compute_dtype_of(scores3))
    _, n, k = scores3.shape
    device = scores3.device
    if cluster_weights is None:
        r, has_zeros = check_weights(None, k, "cluster_weights", "", device), False
    else:  # checked on the host (one transfer), where whether some weight is 0 costs no device synchronisation
        r_host = checked_host_weights(cluster_weights, k, "cluster_weights", "number of clusters K (last dimension)",
                                      (n, k))  # fmt: skip
        r, has_zeros = r_host.to(device), bool((r_host.numpy() == 0).any())
    c = check_weights(sample_weights, n, "sample_weights", "number of samples N (second-to-last dimension)", device,
                      (n, k))  # fmt: skip
    col_max, summary, rounding = None, None, marginals_rounding(cluster_weights, sample_weights, k, n)
    if check_values:
        col_max, extremes = judge_score_values(scores3, r, has_zero_weights=has_zeros, epsilon=epsilon,
                                               batched=batched, sample_weights=c, mass_rounding=rounding)  # fmt: skip
        summary = dense_summary(scores3, extremes, has_zeros)
    return Problem(scores=scores3, epsilon=epsilon, sample_weights=c, cluster_weights=r, batched=batched,
                   has_zero_weights=has_zeros, column_max=col_max, mass_rounding=rounding,
                   summary=summary)  # fmt: skip


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    """The index of the first ``True`` of a 2-d or 3-d mask, in row-major order."""
    return tuple(int(i) for i in torch.nonzero(mask)[0])
