"""Streaming == dense: scores from torch tensors, NumPy arrays and memory-mapped ``.npy`` files, features with
prototypes, chunk sizes that do not divide N; validation done chunk by chunk reports global indices.

Dense comparisons use a fixed iteration count (``tol=None``) so both sides run the same number of steps; the
paths differ only in fp32 rounding (the dense CPU path exponentiates once, the streamed one every pass).
"""

from __future__ import annotations

import errno
import math
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import assert_close, centred, random_problem, random_weights

from otlabel import InputWarning, sinkhorn_assign, streaming
from otlabel.host_sources import BYTES_PER_ENTRY, FeatureSource, HostSource
from otlabel.outputs import OutputError
from otlabel.streaming import sinkhorn_assign_stream

N, K, EPS, ITERS = 203, 11, 0.1, 40


def budget_for(rows: int, k: int = K, h: int = 1) -> int:
    """A memory budget that gives chunks of ``rows`` samples."""
    return BYTES_PER_ENTRY * rows * k * h


def assert_same_solution(res, ref, atol_b=1e-4, what=""):
    where = torch.nonzero(res.labels != ref.labels)[:5]
    assert torch.equal(res.labels, ref.labels), f"{what}: labels differ at {where}"
    assert_close(res.cluster_potentials, ref.cluster_potentials.cpu(), atol=atol_b, what=f"{what} potentials")
    assert res.n_iter == ref.n_iter


@pytest.fixture(scope="module")
def problem():
    scores = random_problem(N, K, seed=0)
    c, r = random_weights(N, seed=1), random_weights(K, seed=2)
    ref = sinkhorn_assign(scores, EPS, sample_weights=c, cluster_weights=r, tol=None, max_iter=ITERS)
    return scores, c, r, ref


@pytest.mark.parametrize("kind", ["tensor", "array", "memmap", "path"])
@pytest.mark.parametrize("rows", [37, 64, N])  # 37 and 64 do not divide 203; N is one chunk
def test_scores_stream_matches_dense(problem, kind, rows, tmp_path):
    scores, c, r, ref = problem
    path = tmp_path / "s.npy"
    np.save(path, scores.numpy())
    data = {
        "tensor": scores,
        "array": scores.numpy(),
        "memmap": np.load(path, mmap_mode="r"),
        "path": str(path),
    }[kind]
    res = sinkhorn_assign_stream(
        data, EPS, sample_weights=c, cluster_weights=r, tol=None, max_iter=ITERS, memory_budget=budget_for(rows)
    )
    assert_same_solution(res, ref, what=f"{kind}/{rows} rows")
    assert_close(res.codes, ref.codes, atol=1e-5, what="codes")
    assert_close(res.objective, ref.objective, atol=1e-6, what="objective")


def test_chunking_really_happens():
    src = HostSource(np.zeros((N, K), np.float32), "cpu", memory_budget=budget_for(37))
    assert src.rows_per_chunk == 37


def test_converged_stream_matches_dense():
    scores = random_problem(500, 9, seed=3)
    # the stream mixes from the first step; "auto" in memory starts a problem this small with compiled plain steps
    ref = sinkhorn_assign(scores, EPS, tol=1e-6, acceleration="anderson")
    res = sinkhorn_assign_stream(scores.numpy(), EPS, tol=1e-6, memory_budget=budget_for(70, 9))
    assert res.converged and ref.converged and abs(res.n_iter - ref.n_iter) <= 2
    assert torch.equal(res.labels, ref.labels)
    assert_close(centred(res.cluster_potentials), centred(ref.cluster_potentials), atol=1e-4, what="potentials")


def test_batched_heads_and_fp16_file(tmp_path):
    scores = random_problem(N, K, h=3, seed=4).half()  # (H, N, K) fp16 on disk, fp32 arithmetic
    np.save(tmp_path / "s.npy", scores.numpy())
    ref = sinkhorn_assign(scores, EPS, tol=None, max_iter=ITERS)
    res = sinkhorn_assign_stream(tmp_path / "s.npy", EPS, tol=None, max_iter=ITERS, memory_budget=budget_for(50, h=3))
    assert res.labels.shape == (3, N)
    assert_same_solution(res, ref, what="fp16 heads")


@pytest.mark.parametrize("heads", [None, 2])
def test_features_match_dense_scores(heads, tmp_path):
    g = torch.Generator().manual_seed(5)
    z = torch.nn.functional.normalize(torch.randn(N, 8, generator=g), dim=1)  # (N, D)
    shape = (K, 8) if heads is None else (heads, K, 8)
    protos = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
    bias = 0.1 * torch.randn(K, generator=g)
    scores = torch.matmul(z, protos.transpose(-1, -2)) + bias  # (N, K) or (H, N, K)
    ref = sinkhorn_assign(scores, 0.05, tol=None, max_iter=ITERS)
    np.save(tmp_path / "z.npy", z.numpy())
    res = sinkhorn_assign_stream(
        features=str(tmp_path / "z.npy"),
        prototypes=protos.numpy(),
        bias=bias,
        epsilon=0.05,
        tol=None,
        max_iter=ITERS,
        memory_budget=budget_for(29, h=heads or 1),
    )
    assert_same_solution(res, ref, atol_b=2e-4, what="features")
    assert_close(res.codes, ref.codes, atol=1e-4, what="codes")


def test_autocast_does_not_reach_the_passes_on_the_callers_thread(monkeypatch):
    """On a GPU the log-domain passes (streamed chunks, the torch backend) run on the caller's thread, where a training
    step's torch.autocast turned their float32 products (bmm, baddbmm) into bfloat16/float16 ones: column sums off by
    ~3e-3, far above tol. Simulated on the CPU by running every pass on the caller's thread: the same solves, bit for
    bit, inside an autocast region and outside it."""
    from otlabel.backends import torch_backend

    monkeypatch.setattr(torch_backend.LogDomainOperator, "parallel", property(lambda self: False, lambda self, _: None),
                        raising=False)  # fmt: skip
    monkeypatch.setattr(torch_backend, "available_memory_bytes", lambda: 0)  # in memory: the log-domain operator
    monkeypatch.setattr(torch_backend, "KERNEL_ALWAYS_FITS_BYTES", 0)  # and asked even for a small one
    g = torch.Generator().manual_seed(6)
    z, protos = torch.randn(N, 8, generator=g), torch.randn(K, 8, generator=g)
    scores = random_problem(N, K, seed=6)
    solves = {
        "stream": lambda: sinkhorn_assign_stream(scores.numpy(), EPS, memory_budget=budget_for(37)),
        "features": lambda: sinkhorn_assign(features=z, prototypes=protos, epsilon=1.0),
        "torch": lambda: sinkhorn_assign(scores, EPS, backend="torch"),
    }
    for name, solve in solves.items():
        want = solve()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = solve()
            got_codes, got_objective = got.codes, got.objective
        assert got.n_iter == want.n_iter and got.marginal_error == want.marginal_error, name
        assert torch.equal(got.labels, want.labels) and torch.equal(got_codes, want.codes), name
        assert got_objective == want.objective, name


def test_outputs_written_chunk_by_chunk(problem, tmp_path):
    scores, c, r, ref = problem
    res = sinkhorn_assign_stream(
        scores,
        EPS,
        sample_weights=c,
        cluster_weights=r,
        tol=None,
        max_iter=ITERS,
        memory_budget=budget_for(50),
        labels_out=tmp_path / "labels.npy",
        codes_out=tmp_path / "codes.npy",
    )
    labels, codes = np.load(tmp_path / "labels.npy"), np.load(tmp_path / "codes.npy")
    assert labels.dtype == np.int64 and labels.shape == (N,) and codes.shape == (N, K)
    assert np.array_equal(labels, ref.labels.numpy())
    assert_close(torch.from_numpy(codes), ref.codes, atol=1e-5, what="codes file")
    assert np.array_equal(res.labels.numpy(), labels)
    preallocated = np.full(N, -1, dtype=np.int64)
    sinkhorn_assign_stream(scores, EPS, tol=None, max_iter=3, labels_out=preallocated)
    assert (preallocated >= 0).all()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd (Linux)")
def test_labels_kept_from_a_path_hold_no_file_open(tmp_path):
    """Each epoch writes labels_out="labels.npy" and keeps its labels (say, to compare epochs): a view of the file
    kept one descriptor open per epoch, and the disk space of every file a later epoch renamed over it."""
    scores = random_problem(50, 4, seed=4).numpy()
    path = tmp_path / "labels.npy"
    sinkhorn_assign_stream(scores, EPS, tol=None, max_iter=3, labels_out=path)  # first-call imports open nothing after
    before = len(os.listdir("/proc/self/fd"))
    kept = [sinkhorn_assign_stream(scores, EPS, tol=None, max_iter=3, labels_out=path).labels for _ in range(5)]
    assert len(os.listdir("/proc/self/fd")) == before
    assert all(np.array_equal(labels.numpy(), np.load(path)) for labels in kept)
    res = sinkhorn_assign_stream(scores, EPS, tol=None, max_iter=3, labels_out=path)
    res.labels[:] = -1  # the result's own copy: the file keeps the labels
    assert (np.load(path) >= 0).all()
    assert res.codes.shape == (50, 4)  # computes the labels again, elsewhere than the published file
    assert np.array_equal(np.load(path), kept[0].numpy())


def test_labels_too_large_to_copy_stay_a_view_of_their_file(tmp_path, monkeypatch):
    """Labels are written to a path when memory is short: where a copy would take more than an eighth of the memory
    available, the result keeps the view of the file (a copy failing after the solve would lose it)."""
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda: 8 * 50 * 8 - 1)  # 50 labels: just too many
    path = tmp_path / "labels.npy"
    res = sinkhorn_assign_stream(random_problem(50, 4, seed=4).numpy(), EPS, tol=None, max_iter=3, labels_out=path)
    res.labels[:] = -1  # a view: written through to the file
    assert (np.load(path) == -1).all()
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda: 8 * 50 * 8)  # fits: a copy
    res = sinkhorn_assign_stream(random_problem(50, 4, seed=4).numpy(), EPS, tol=None, max_iter=3, labels_out=path)
    res.labels[:] = -1
    assert (np.load(path) >= 0).all()


def test_the_labels_file_is_renamed_last(tmp_path, monkeypatch):
    """Whoever waits for labels_out finds codes_out beside it already new: the codes are renamed into place first,
    so a rename that fails between the two leaves the old labels (never new labels beside old codes)."""
    labels_path, codes_path = tmp_path / "labels.npy", tmp_path / "codes.npy"
    np.save(labels_path, np.zeros(3)), np.save(codes_path, np.zeros(3))
    real_replace, renamed = os.replace, []

    def replace(src, dst):
        renamed.append(os.path.basename(dst))
        if len(renamed) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    scores = random_problem(20, 4, seed=3).numpy()
    with pytest.raises(OutputError, match="labels.npy"):
        sinkhorn_assign_stream(scores, EPS, tol=None, max_iter=3, labels_out=labels_path, codes_out=codes_path)
    assert renamed == ["codes.npy", "labels.npy"]
    assert np.load(labels_path).shape == (3,) and np.load(codes_path).shape == (20, 4)  # old labels, new codes
    assert sorted(os.listdir(tmp_path)) == ["codes.npy", "labels.npy"]  # no temporary file left


def test_warm_start_validates_and_converges_fast(problem):
    scores, _, _, _ = problem
    first = sinkhorn_assign_stream(scores, EPS, tol=1e-6)
    again = sinkhorn_assign_stream(scores, EPS, tol=1e-6, init=first)
    assert again.n_iter <= 2 and torch.equal(again.labels, first.labels)
    bad = scores.clone()
    bad[150, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN \(first at index \(150, 3\)"):
        sinkhorn_assign_stream(bad, EPS, init=first, memory_budget=budget_for(37))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.__setitem__((150, 3), float("nan")), r"NaN \(first at index \(150, 3\)"),
        (
            lambda s: s.__setitem__((120, 0), float("inf")),
            r"\+inf, or scores / epsilon overflow \(first at index "
            r"\(120, 0\)",
        ),
        (lambda s: s.mul_(1e12), r"scores / epsilon reach .*e\+1\d"),
        (lambda s: s.__setitem__(170, float("-inf")), r"sample 170 \(head 0\) has every score -inf"),
        (lambda s: s[:, 4].fill_(float("-inf")), r"cluster 4 \(head 0\) has weight"),
    ],
)
def test_validation_reports_global_indices(edit, message):
    scores = random_problem(N, K, seed=6)
    edit(scores)
    with pytest.raises(ValueError, match=message):
        sinkhorn_assign_stream(scores.numpy(), EPS, memory_budget=budget_for(37))


@pytest.mark.parametrize("features", [False, True])
def test_a_streamed_span_error_says_the_size_of_the_scores_and_epsilon(features):
    """The dense paths' range error says "(|scores| up to X, epsilon Y)"; the streamed one gave |S| / eps alone, so a
    caller could not tell whether the scores were large or epsilon small. A cluster far below the rest is named with
    its best score (streamed and sharded)."""
    from otlabel import sinkhorn_assign_sharded

    scores = random_problem(N, K, seed=6)
    scores[77, 2] = 2500.0  # |S| / eps = 25,000 at eps 0.1
    data = dict(features=scores.numpy(), prototypes=np.eye(K, dtype=np.float32)) if features else dict(scores=scores)
    with pytest.raises(
        ValueError, match=r"scores / epsilon reach 2\.5e\+04 \(\|scores\| up to 2\.5e\+03, epsilon 0\.1\)"
    ):
        sinkhorn_assign_stream(**data, epsilon=0.1, memory_budget=budget_for(37))
    if features:
        return  # the column check below reads scores alone
    far = random_problem(N, K, seed=6)
    far[:, 4] -= 1000  # every score of cluster 4 near -1,000: each row's maximum is still small
    for solve in (sinkhorn_assign_stream, sinkhorn_assign_sharded):
        with pytest.raises(
            ValueError, match=r"reach 9\.9\de\+03 \(cluster 4, head 0: its best score -99\d, epsilon 0\.1\)"
        ):
            solve(far.numpy() if solve is sinkhorn_assign_stream else far, 0.1)


def run_conversion_advice(message: str, path) -> list[int]:
    """Run the block-by-block conversion a message advises, as written, on the file ``path`` (into new.npy in the
    current folder); the number of values each block read."""
    advice = re.search(r"x = (np\.load\(path, mmap_mode='r'\)(?:\[.*?\])*|np\.memmap\(path, .*?\)), "
                       r"y = (np\.lib\.format\.open_memmap\(.*?, x\.shape\)), "
                       r"then (y\[.*?\] = .*?) for i in (range\(.*?\)), and y\.flush\(\)\.", message)  # fmt: skip
    assert advice, message
    blocks = []

    class Reads(np.memmap):  # the file, recording the size of each block read from it
        def __getitem__(self, index):
            block = super().__getitem__(index)
            blocks.append(np.size(block))
            return block

    space = {"np": np, "path": str(path)}
    space["x"] = eval(advice[1], space).view(Reads)
    space["y"] = eval(advice[2], space)
    exec(f"for i in {advice[4]}: {advice[3]}\ny.flush()", space)
    return blocks


def advised_values(x, path) -> tuple[str, list[int], np.ndarray]:
    """Refuse ``x`` (streamed), run the conversion advice as written on the file ``path`` and take the view of the new
    file it ends with (the new file, where it names none): the message, the blocks read, and what the user passes."""
    with pytest.raises(TypeError, match="Convert the file a block of rows at a time") as refused:
        sinkhorn_assign_stream(x)
    message = str(refused.value)
    blocks = run_conversion_advice(message, path)
    said = re.search(r"which your array changes: pass (y.*?), your view of the new file\.$", message)
    return message, blocks, eval(said[1] if said else "y", {"y": np.load("new.npy", mmap_mode="r")})


@pytest.mark.parametrize("shape", [(50, 3), (2, 50, 3)])
def test_the_advice_for_a_file_of_another_dtype_converts_it_in_blocks_of_rows(shape, tmp_path, monkeypatch):
    """An integer .npy file is refused with advice to convert it a block of rows at a time: for an (H, N, K) file of
    heads the blocks were along the heads, one block for the whole file. Run as written, the advice writes the file's
    values as float32, in blocks of at most BLOCK_ENTRIES values (made small here)."""
    from otlabel import inputs

    monkeypatch.setattr(inputs, "BLOCK_ENTRIES", 64, raising=False)
    monkeypatch.chdir(tmp_path)
    values = np.arange(math.prod(shape), dtype=np.int32).reshape(shape) - 40
    np.save(tmp_path / "ints.npy", values)
    with pytest.raises(TypeError, match="got dtype int32. Convert the file a block of rows at a time") as refused:
        sinkhorn_assign_stream(tmp_path / "ints.npy")
    blocks = run_conversion_advice(str(refused.value), tmp_path / "ints.npy")
    assert len(blocks) > 1 and max(blocks) <= 64, blocks
    converted = np.load(tmp_path / "new.npy")
    assert converted.dtype == np.float32 and np.array_equal(converted, values)


@pytest.mark.parametrize("view", ["[::-1]", "[:, ::-1]", "[::-1, ::-1]", ".T", "3d"])
def test_the_advice_for_a_view_of_a_file_of_another_dtype_ends_with_the_same_view(view, tmp_path, monkeypatch):
    """A reversed or transposed view of an integer .npy file (np.load(path, mmap_mode='r')[::-1]) was advised the
    conversion of the whole file, which keeps the file's order: the new file passed as advised solved the scores
    unreversed. The advice now ends with the same view of the new file (y[::-1], y.T, y.transpose(1, 0, 2)[:, ::-1]);
    run as written, with the blocks sized by the file's rows, it solves as the view's float32 values."""
    from otlabel import inputs

    monkeypatch.setattr(inputs, "BLOCK_ENTRIES", 64, raising=False)
    monkeypatch.chdir(tmp_path)
    shape = (2, 30, 4) if view == "3d" else (30, 4)
    np.save(tmp_path / "ints.npy", np.random.default_rng(0).integers(-9, 9, shape, dtype=np.int32))
    file = np.load(tmp_path / "ints.npy", mmap_mode="r")
    x = file.transpose(1, 0, 2)[:, ::-1] if view == "3d" else eval(f"file{view}")
    message, blocks, given = advised_values(x, tmp_path / "ints.npy")
    assert "your view of the new file." in message and len(blocks) > 1 and max(blocks) <= 64, (message, blocks)
    kw = dict(epsilon=0.5, tol=None, max_iter=3)
    want = sinkhorn_assign_stream(x.astype(np.float32), **kw)
    assert_bitwise_same(sinkhorn_assign_stream(given, **kw), want, message)
    unviewed = sinkhorn_assign_stream(np.load("new.npy"), **kw)  # what the advice alone gave
    assert unviewed.labels.shape != want.labels.shape or not torch.equal(unviewed.labels, want.labels)


def test_the_advice_for_a_slice_of_a_file_of_another_dtype_says_to_slice_the_new_file(tmp_path):
    """A slice of an integer file (rows 10-20, every other column) cannot be told apart as one expression: the advice,
    which converts the whole file, says to pass the same view of the new file. The whole file, and a raw np.memmap
    (no .npy header to read the file's shape from), get the advice alone."""
    np.save(tmp_path / "ints.npy", np.zeros((30, 4), np.int32))
    file = np.load(tmp_path / "ints.npy", mmap_mode="r")
    np.zeros((30, 4), np.int32).tofile(tmp_path / "raw.bin")
    raw = np.memmap(tmp_path / "raw.bin", dtype=np.int32, mode="r", shape=(30, 4))
    for x, same_view in ((file[10:20], True), (file[:, ::2], True), (file, False), (raw, False)):
        with pytest.raises(TypeError, match="Convert the file a block of rows at a time") as refused:
            sinkhorn_assign_stream(x)
        says = "pass the same view of the new file (slice, transpose, reversal) as your array is of this one."
        assert str(refused.value).endswith(says) == same_view, str(refused.value)
        assert str(refused.value).endswith("y.flush().") != same_view, str(refused.value)


@pytest.mark.parametrize(
    "layout, view",
    [("F", ""), ("F", "[::-1]"), ("F", ".T"), ("C", ".reshape(20, 6)"), ("C", "[:1].T"), ("offset", "")]
    + [("C", "[::-2]")],
)
def test_the_advice_for_any_view_of_a_file_of_another_dtype_gives_the_views_values(layout, view, tmp_path, monkeypatch):
    """The view ending the conversion advice was read from the view's strides as if the file were C-ordered and whole
    from x.offset: a Fortran-ordered file as loaded was told to pass y.T (its [::-1] y.T[::-1], its .T nothing), a
    reshape of the whole file nothing (the new file has the file's shape) or y[::-1] for a reversed one, a transposed
    1-row file nothing, and a np.memmap opened one row past the header nothing, as if it were the whole file. Run as
    written, the advice and the view it ends with (or the new file, where it names none) now give the view's values,
    and a view no expression gives (a step, a memmap missing rows) is told to pass the same view."""
    from otlabel import inputs

    monkeypatch.setattr(inputs, "BLOCK_ENTRIES", 64, raising=False)
    monkeypatch.chdir(tmp_path)
    values = np.random.default_rng(1).integers(-9, 9, (1, 4) if view == "[:1].T" else (30, 4), dtype=np.int32)
    np.save(tmp_path / "ints.npy", np.asfortranarray(values) if layout == "F" else values)
    file = np.load(tmp_path / "ints.npy", mmap_mode="r")
    x = eval(f"file{view}")
    if layout == "offset":  # opened directly, one row past the header: rows 1-29
        x = np.memmap(tmp_path / "ints.npy", np.int32, "r", offset=file.offset + 16, shape=(29, 4))
    message, _, given = advised_values(x, tmp_path / "ints.npy")
    if layout == "offset" or view == "[::-2]":
        assert message.endswith("pass the same view of the new file (slice, transpose, reversal) as your array is of "
                                "this one."), message  # fmt: skip
        return
    assert given.shape == x.shape and np.array_equal(given, x), message


@pytest.mark.parametrize("view", ["", "[::-1]", ".T", "offset", "F"])
def test_the_advice_for_a_raw_file_of_another_dtype_opens_it_as_it_was_opened(view, tmp_path, monkeypatch):
    """A raw file (no .npy header) opened with np.memmap was told to convert it starting from x = np.load(path,
    mmap_mode='r'), which fails there ("This file contains pickled (object) data"). The advice now opens it as the
    memmap was opened (np.memmap(path, dtype, 'r', offset, shape, order)); run as written, it and the view it ends
    with give the array's values (one row past the start, Fortran order, reversed, transposed)."""
    from otlabel import inputs

    monkeypatch.setattr(inputs, "BLOCK_ENTRIES", 64, raising=False)
    monkeypatch.chdir(tmp_path)
    np.random.default_rng(2).integers(-9, 9, (30, 4), dtype=np.int32).tofile(tmp_path / "ints.bin")
    opened = dict(offset=16, shape=(29, 4)) if view == "offset" else dict(shape=(30, 4))
    opened |= dict(order="F") if view == "F" else {}
    x = np.memmap(tmp_path / "ints.bin", np.int32, "r", **opened)
    x = eval(f"x{view}") if view.startswith((".", "[")) else x
    message, blocks, given = advised_values(x, tmp_path / "ints.bin")
    assert len(blocks) > 1 and max(blocks) <= 64, blocks
    assert given.shape == x.shape and np.array_equal(given, x), message


@pytest.mark.parametrize("view", ["['score']", "['score'][::-1]", "['a']['b'].T"])
def test_the_advice_for_an_integer_field_of_a_records_file_converts_that_field(view, tmp_path, monkeypatch):
    """An integer field of a memory-mapped records file (np.load(path, mmap_mode='r')['score'], as the records advice
    says to pass it) was told to convert the file from np.load(path, mmap_mode='r'), the records, which cannot be set
    into float32 blocks, or from np.memmap(path, np.dtype('<i2'), ...), which reads the records' bytes as int16
    values. The advice now converts the field, np.load(path, mmap_mode='r')['score'] (nested: ['a']['b']); run as
    written, it and the view it ends with give the field's values."""
    from otlabel import inputs

    monkeypatch.setattr(inputs, "BLOCK_ENTRIES", 64, raising=False)
    monkeypatch.chdir(tmp_path)
    nested = view.startswith("['a']")
    records = np.zeros(
        30, [("a", [("c", "<i4"), ("b", "<i2")], (4,))] if nested else [("id", "<i4"), ("score", "<i2", (4,))]
    )
    values = np.random.default_rng(3).integers(-9, 9, (30, 4), dtype=np.int16)
    if nested:
        records["a"]["b"] = values
    else:
        records["score"] = values
    np.save(tmp_path / "records.npy", records)
    x = eval(f"np.load(path, mmap_mode='r'){view}", {"np": np, "path": str(tmp_path / "records.npy")})
    message, blocks, given = advised_values(x, tmp_path / "records.npy")
    assert len(blocks) > 1 and max(blocks) <= 64, blocks
    assert given.shape == x.shape and np.array_equal(given, x), message


def test_an_in_memory_copy_of_a_memmap_of_another_dtype_is_told_to_convert_it_in_memory(tmp_path):
    """A copy of a memory-mapped integer file (x.copy(), x.astype(np.int64), or the reshape of a Fortran-ordered
    file, which copies) is still of type np.memmap, but in memory, with no file: it was told to convert "the file"
    from np.load(path, mmap_mode='r'), a file it has not. It is told x.astype(np.float32), as arrays in memory are."""
    np.save(tmp_path / "ints.npy", np.asfortranarray(np.arange(24, dtype=np.int32).reshape(6, 4)))
    file = np.load(tmp_path / "ints.npy", mmap_mode="r")
    for x in (file.copy(), file.astype(np.int64), file.reshape(-1)):
        assert isinstance(x, np.memmap) and x.filename is None
        with pytest.raises(TypeError, match=r"got dtype int(32|64)\. Convert with x\.astype\(np\.float32\)\.$"):
            sinkhorn_assign_stream(x)


def test_the_advice_for_a_bfloat16_file_works(tmp_path, monkeypatch):
    """A bfloat16 .npy (ml_dtypes saves its 2-byte raw values: NumPy reads dtype V2) was refused with advice to convert
    with x.astype(np.float32) (in memory, np.asarray(x, dtype=np.float32)), which fails on raw values ("setting an
    array element with a sequence"). Both fixes now advised, run as written, work: the bfloat16 tensor that shares
    the values' memory solves as the bfloat16 values do, and the float32 conversion (a block of rows at a time for a
    file) holds their values."""
    values = torch.randn(50, 3, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    path = tmp_path / "bf16.npy"
    np.save(path, values.view(torch.int16).numpy().view("V2"))
    monkeypatch.chdir(tmp_path)
    kw = dict(tol=None, max_iter=5)
    want = sinkhorn_assign_stream(values, **kw)
    for solve, given in ((sinkhorn_assign_stream, path), (sinkhorn_assign_stream, np.load(path, mmap_mode="r")),
                         (sinkhorn_assign_stream, np.load(path)), (sinkhorn_assign, np.load(path))):  # fmt: skip
        with pytest.raises(TypeError, match=r"dtype \|V2: 2-byte raw values, as NumPy saves bfloat16") as refused:
            solve(given)
        message = str(refused.value)
        x = given if isinstance(given, np.ndarray) else np.load(path, mmap_mode="r")
        assert "a bfloat16 tensor that shares their memory, torch.from_numpy(x.view" in message, message
        shared = advised_bfloat16_tensor(message, x)
        assert_bitwise_same(sinkhorn_assign_stream(shared, **kw), want, f"{message}: the shared tensor")
        if isinstance(x, np.memmap):
            run_conversion_advice(message, path)
            converted = np.load("new.npy")
        else:
            convert = re.search(r"Convert with (.*)\.$", message)
            assert convert, message
            converted = eval(convert[1], {"np": np, "x": x})
        assert converted.dtype == np.float32 and np.array_equal(converted, values.float().numpy()), message


def test_the_advice_for_a_reversed_bfloat16_view_works(tmp_path):
    """A reversed view of bfloat16 raw values (np.load(path, mmap_mode='r')[::-1], dtype V2) was advised to pass
    torch.from_numpy(x.view(np.int16)).view(torch.bfloat16), which torch refuses for a negative stride ("At least one
    stride in the given numpy array is negative"). The tensor advised, run as written, now solves as the reversed
    bfloat16 values do."""
    values = torch.randn(50, 3, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    path = tmp_path / "bf16.npy"
    np.save(path, values.view(torch.int16).numpy().view("V2"))
    kw = dict(tol=None, max_iter=5)
    for dims in ((0,), (0, 1)):
        want = sinkhorn_assign_stream(values.flip(dims), **kw)
        flip = (slice(None, None, -1),) * len(dims)
        arrays = np.load(path, mmap_mode="r")[flip], np.load(path)[flip]
        for solve, x in ((sinkhorn_assign_stream, arrays[0]), (sinkhorn_assign_stream, arrays[1]),
                         (sinkhorn_assign, arrays[1])):  # fmt: skip
            with pytest.raises(TypeError, match=r"dtype \|V2: 2-byte raw values") as refused:
                solve(x)
            message = str(refused.value)
            given = advised_bfloat16_tensor(message, x)
            assert_bitwise_same(sinkhorn_assign_stream(given, **kw), want, f"{message}: the advised tensor")


def advised_bfloat16_tensor(message: str, x: np.ndarray) -> torch.Tensor:
    """The bfloat16 tensor an error ``message`` about raw 2-byte values advises, run as written on ``x``."""
    tensor = re.search(r"(torch\.from_numpy\(.*?\)\.view\(torch\.bfloat16\))", message)
    assert tensor, message
    with warnings.catch_warnings():  # torch.from_numpy of a read-only memmap: "The given NumPy array is not ...
        warnings.simplefilter("ignore", UserWarning)
        return eval(tensor[1], {"np": np, "torch": torch, "x": x})


def test_bad_arguments(tmp_path):
    z, p = np.zeros((5, 4), np.float32), np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="either scores, or features"):
        sinkhorn_assign_stream(np.zeros((5, 3), np.float32), features=z, prototypes=p)
    with pytest.raises(ValueError, match="prototypes and bias go with features=, not with scores"):
        sinkhorn_assign_stream(np.zeros((5, 3), np.float32), bias=np.zeros(3))  # a bias alone, too
    with pytest.raises(ValueError, match="features need prototypes"):
        sinkhorn_assign_stream(features=z)
    with pytest.raises(ValueError, match=r"prototypes must have shape \(K, D\) .* D = 4"):
        FeatureSource(z, np.zeros((3, 5), np.float32))
    with pytest.raises(FileNotFoundError, match="scores file .* does not exist"):
        sinkhorn_assign_stream(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "ints.npy", np.zeros((5, 3), np.int64))
    # A file (perhaps larger than memory) is converted a block at a time: x.astype(np.float32) would read it whole
    blocks = r"open_memmap\(.*np\.float32, x\.shape\), then y\[i : i \+ \d+\] = x\[i : i \+ \d+\]"
    for given in (str(tmp_path / "ints.npy"), np.load(tmp_path / "ints.npy", mmap_mode="r")):
        with pytest.raises(TypeError, match=f"float16, float32 or float64, got dtype int64. .*{blocks}"):
            sinkhorn_assign_stream(given)
    with pytest.raises(TypeError, match=r"got dtype int64. Convert with x.astype\(np.float32\)"):  # in memory
        sinkhorn_assign_stream(np.zeros((5, 3), np.int64))
    # Integer and bool tensors were told only "must be a float16, ... tensor", not how to convert, as other paths say.
    ints = torch.ones(5, 3, dtype=torch.int64)
    for kwargs, name in ((dict(scores=ints), "scores"), (dict(scores=ints.bool()), "scores"),
                         (dict(features=ints, prototypes=p), "features"),
                         (dict(features=z, prototypes=torch.ones(3, 4, dtype=torch.int32)), "prototypes"),
                         (dict(features=z, prototypes=p, bias=torch.ones(3, dtype=torch.int32)), "bias")):  # fmt: skip
        says = rf"^{name} must be a float16, bfloat16, float32 or float64 tensor, got torch\.\w+\. "
        with pytest.raises(TypeError, match=says + rf"Convert with {name}\.float\(\)"):
            sinkhorn_assign_stream(**kwargs)
    with warnings.catch_warnings():  # torch deprecates quantized tensors, and warns at their creation
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_tensor(torch.ones(5, 3), 0.1, 0, torch.qint8)
    with pytest.raises(TypeError, match=r"got torch\.qint8\. Convert with scores\.dequantize\(\)"):  # .float() raises
        sinkhorn_assign_stream(quantized)
    with pytest.raises(ValueError, match=r"shape \(N, K\) or \(H, N, K\)"):
        sinkhorn_assign_stream(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="cluster_weights must have shape"):
        sinkhorn_assign_stream(np.zeros((5, 3), np.float32), cluster_weights=np.ones(4) / 4)
    with pytest.raises(ValueError, match="labels_out must have"):
        sinkhorn_assign_stream(np.zeros((5, 3), np.float32), labels_out=np.zeros(4, np.int64))


def test_output_errors_speak_in_the_callers_layout():
    """A wrong output is described in the shape the caller passed: (N,) / (N, K) for 2-d scores (it said "(1, 500)
    elements"), and a wrong dtype is named as the problem (the same sentence covered both)."""
    s2, s3 = np.zeros((500, 10), np.float32), np.zeros((3, 500, 10), np.float32)
    for scores, out, want in (
        (s2, np.zeros(499, np.int64), r"\(500,\) \(500 elements\), got shape \(499,\)"),
        (s3, np.zeros(500, np.int64), r"\(3, 500\) \(1,500 elements\), got shape \(500,\)"),
    ):
        with pytest.raises(ValueError, match=f"labels_out must have shape {want}"):
            sinkhorn_assign_stream(scores, labels_out=out)
    with pytest.raises(ValueError, match=r"codes_out must have shape \(500, 10\) \(5,000 elements\)"):
        sinkhorn_assign_stream(s2, codes_out=np.zeros((10, 499), np.float32))
    with pytest.raises(ValueError, match=r"labels_out must be int64, got int32: allocate it as np.empty\(\(500,\), "):
        sinkhorn_assign_stream(s2, labels_out=np.zeros(500, np.int32))
    with pytest.raises(ValueError, match=r"codes_out must be float32, got float64"):
        sinkhorn_assign_stream(s2, codes_out=np.zeros((500, 10)))
    # The right size in the transposed layout would be filled in (N, K) order and read as garbage: refused.
    with pytest.raises(ValueError, match=r"codes_out must have shape \(500, 10\) .*, got shape \(10, 500\)"):
        sinkhorn_assign_stream(s2, codes_out=np.zeros((10, 500), np.float32))
    flat = np.zeros(5000, np.float32)  # flat is fine
    with pytest.warns(InputWarning, match="same scores"):  # (s2's rows are alike: the collapse warning, rightly)
        res = sinkhorn_assign_stream(s2 + np.arange(10, dtype=np.float32), tol=None, max_iter=2, codes_out=flat)
    assert np.array_equal(flat.reshape(500, 10), res.codes.numpy())


def test_outputs_that_cannot_be_written_in_place_say_what_to_pass():
    """Outputs are written in place: a sparse one raised torch's page-long NotImplementedError (aten::view), a nested
    one its "Internal error", and codes_out requiring grad "a leaf Variable that requires grad is being used in an
    in-place operation". Each is refused, naming what to pass: nothing is detached or copied behind the caller's
    back."""
    s2 = random_problem(12, 3, seed=8).numpy()
    labels, codes = torch.zeros(12, dtype=torch.int64), torch.zeros(12, 3)
    ragged = torch.nested.as_nested_tensor([labels, labels[:5]], layout=torch.jagged)
    for kwargs, says in (
        (dict(labels_out=labels.to_sparse()), r"^labels_out is a sparse_coo tensor: .*np\.empty\(\(12,\), np\.int"),
        (dict(codes_out=codes.to_sparse()), r"^codes_out is a sparse_coo tensor: .*np\.empty\(\(12, 3\), np\.f"),
        (dict(labels_out=ragged), "^labels_out is a nested tensor: .* or a path"),
        (dict(codes_out=codes.requires_grad_()), r"^codes_out requires grad: .* codes_out\.detach\(\)"),
        (dict(codes_out=codes[:]), r"^codes_out requires grad"),  # a view of it, which torch refused the same
        (dict(codes_out=codes * 2), r"^codes_out requires grad"),  # torch wrote into it, through autograd
    ):  # fmt: skip
        with pytest.raises(TypeError, match=says):
            sinkhorn_assign_stream(s2, **kwargs)
    assert not codes.any()  # refused before anything was written
    res = sinkhorn_assign_stream(s2, tol=None, max_iter=3, codes_out=codes.detach())  # the fix given: its memory
    assert torch.equal(codes.detach(), res.codes) and codes.requires_grad


def test_negative_strides_and_float64_codes(tmp_path):
    """A reversed NumPy view (torch cannot share it: it said "negative strides are not currently supported") streams
    as the same values copied, converted a chunk at a time, as a big-endian one is (it was refused, with advice to copy
    it whole, while a reversed big-endian view streamed); float64 scores give float64 codes, as in memory (they were
    float32)."""
    scores = np.random.default_rng(0).standard_normal((40, 6))
    np.save(tmp_path / "s.npy", scores)
    kw = dict(tol=None, max_iter=5, memory_budget=budget_for(7, k=6))  # chunks that do not divide N
    for flip in (np.s_[::-1], np.s_[:, ::-2], np.s_[::-3, ::-1]):
        want = sinkhorn_assign_stream(np.ascontiguousarray(scores[flip]), **kw)
        for name, view in (("array", scores[flip]), ("memmap", np.load(tmp_path / "s.npy", mmap_mode="r")[flip]),
                           ("big-endian", scores.astype(">f8")[flip])):  # fmt: skip
            assert_bitwise_same(sinkhorn_assign_stream(view, **kw), want, f"{name}{flip}")
    z, c = scores[:, :4].astype(np.float32), np.random.default_rng(1).standard_normal((5, 4), dtype=np.float32)
    reversed_prototypes = sinkhorn_assign_stream(features=z, prototypes=c[::-1], tol=None, max_iter=5)  # small: copied
    copied = sinkhorn_assign_stream(features=z, prototypes=c[::-1].copy(), tol=None, max_iter=5)
    assert torch.equal(reversed_prototypes.labels, copied.labels)
    reversed_features = sinkhorn_assign_stream(features=z[::-1], prototypes=c, epsilon=0.5, **kw)
    assert_bitwise_same(reversed_features, sinkhorn_assign_stream(features=z[::-1].copy(), prototypes=c, epsilon=0.5,
                                                                  **kw), "features")  # fmt: skip
    res = sinkhorn_assign_stream(scores, tol=None, max_iter=5)
    ref = sinkhorn_assign(torch.from_numpy(scores), tol=None, max_iter=5)
    assert res.codes.dtype == torch.float64 == ref.codes.dtype
    assert_close(res.codes, ref.codes, atol=1e-12, what="float64 codes")


def assert_bitwise_same(res, ref, what: str) -> None:
    """Every output of two solves bit for bit: labels, potentials, iteration count, codes."""
    assert res.n_iter == ref.n_iter, what
    for name in ("labels", "cluster_potentials", "codes"):
        assert torch.equal(getattr(res, name), getattr(ref, name)), f"{what}: {name} differ"


@pytest.mark.parametrize("dtype", ["f2", "f4", "f8"])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("heads", [None, 3])
def test_big_endian_score_files_stream_as_their_values(dtype, order, heads, tmp_path):
    """A .npy in non-native byte order (a file written on a big-endian machine) was refused, with advice to convert
    it with x.astype(...), which loads the whole file: no use for a file larger than RAM, the case streaming is for.
    It is converted chunk by chunk as it is read, and solves bit for bit as the same values saved little-endian
    (Fortran-ordered files too)."""
    shape = (N, K) if heads is None else (heads, N, K)
    values = np.random.default_rng(7).standard_normal(shape).astype(dtype)
    values = np.asfortranarray(values) if order == "F" else values
    np.save(tmp_path / "little.npy", values.astype("<" + dtype))
    np.save(tmp_path / "big.npy", values.astype(">" + dtype))
    big = np.load(tmp_path / "big.npy", mmap_mode="r")
    assert big.dtype.str == ">" + dtype and big.flags.f_contiguous == (order == "F")
    kw = dict(epsilon=EPS, tol=1e-6, memory_budget=budget_for(37, h=heads or 1))  # chunks that do not divide N
    ref = sinkhorn_assign_stream(tmp_path / "little.npy", **kw)
    assert_bitwise_same(sinkhorn_assign_stream(tmp_path / "big.npy", **kw), ref, "path")
    assert_bitwise_same(sinkhorn_assign_stream(big, **kw), ref, "memmap")


def test_big_endian_features_prototypes_and_bias_stream_as_their_values(tmp_path):
    """Features, prototypes and bias in big-endian byte order, from files and in memory, solve bit for bit as little-
    endian ones; a bad row of big-endian features is named as in native ones (its error reads that one row)."""
    rng = np.random.default_rng(8)
    z = rng.standard_normal((N, 8)).astype(np.float32)
    c, bias = rng.standard_normal((K, 8)).astype(np.float32), rng.standard_normal(K).astype(np.float32)
    np.save(tmp_path / "z.npy", z.astype(">f4"))
    np.save(tmp_path / "c.npy", c.astype(">f4"))
    kw = dict(epsilon=0.5, tol=1e-6, memory_budget=budget_for(29))
    ref = sinkhorn_assign_stream(features=z, prototypes=c, bias=bias, **kw)
    from_files = sinkhorn_assign_stream(features=tmp_path / "z.npy", prototypes=tmp_path / "c.npy",
                                        bias=bias.astype(">f4"), **kw)  # fmt: skip
    assert_bitwise_same(from_files, ref, "files")
    # sinkhorn_assign streams CPU features too, in its default chunks
    in_memory = sinkhorn_assign(features=z.astype(">f4"), prototypes=c.astype(">f4"), bias=bias.astype(">f4"),
                                epsilon=0.5, tol=1e-6)  # fmt: skip
    native = sinkhorn_assign(features=z, prototypes=c, bias=bias, epsilon=0.5, tol=1e-6)
    assert_bitwise_same(in_memory, native, "in memory")
    z[29, 3] = np.nan
    with pytest.raises(ValueError, match=r"features row 29 contains NaN or inf"):
        sinkhorn_assign_stream(features=z.astype(">f4"), prototypes=c)


BIG_ENDIAN_PEAK_SCRIPT = """
import numpy as np, torch
from otlabel import sinkhorn_assign_stream

torch.set_num_threads(2)  # the peak grows by a few MiB per thread (see test_features.PEAK_SCRIPT)

def kib(field):  # from /proc/self/status: VmRSS now, VmHWM the peak since the last reset
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

# In memory, not a memmap: a memmap's pages count in RSS as a pass reads them, whatever their byte order.
scores = np.random.default_rng(0).standard_normal((100_000, 250), dtype=np.float32){convert}
sinkhorn_assign_stream(scores[:2000], 0.05, max_iter=2, tol=None, memory_budget=8 << 20)  # warm up the code paths
before = kib("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current RSS
res = sinkhorn_assign_stream(scores, 0.05, max_iter=3, tol=None, memory_budget=8 << 20)
assert res.labels.shape == (100_000,)
print((kib("VmHWM:") - before) * 1024)
"""


@pytest.mark.parametrize("convert", ['.astype(">f4")', "[::-1]"])
def test_big_endian_scores_are_converted_within_the_memory_budget(convert):
    """Peak RSS growth of a streamed solve over 100 MB of big-endian (or reversed) scores, in a fresh process, with a
    budget of 8 MiB: converting the scores whole (as in-memory scores are) grew it by their size; by chunks it stays
    within twice the budget."""
    script = BIG_ENDIAN_PEAK_SCRIPT.replace("{convert}", convert)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.strip().splitlines()[-1])
    assert extra < 2 * (8 << 20), f"peak grew by {extra / 2**20:.1f} MiB over 100 MB of scores, budget 8 MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("pinned", [False, True])
def test_cuda_staging_matches_cpu(problem, pinned):
    """Host -> GPU through the pinned double buffers (several chunks, so the prefetch wraps between passes)."""
    scores, c, r, ref = problem
    host = scores.pin_memory() if pinned else scores
    res = sinkhorn_assign_stream(
        host,
        EPS,
        sample_weights=c,
        cluster_weights=r,
        tol=None,
        max_iter=ITERS,
        device="cuda",
        memory_budget=budget_for(37),
    )
    assert res.cluster_potentials.is_cuda
    assert_same_solution(res, ref, what="cuda staging")
    assert_close(res.codes, ref.codes, atol=1e-5, what="codes")


@pytest.mark.gpu
def test_cuda_staging_of_big_endian_scores(problem):
    """Big-endian scores go through the pinned staging buffers converted chunk by chunk, and solve bit for bit as
    native ones. Not yet run on a GPU."""
    scores, c, r, _ = problem
    kw = dict(
        sample_weights=c, cluster_weights=r, tol=None, max_iter=ITERS, device="cuda", memory_budget=budget_for(37)
    )
    ref = sinkhorn_assign_stream(scores.numpy(), EPS, **kw)
    assert_bitwise_same(sinkhorn_assign_stream(scores.numpy().astype(">f4"), EPS, **kw), ref, "cuda staging")


@pytest.mark.gpu
def test_cuda_staging_solved_in_inference_mode_reads_codes_outside_it(problem):
    """The staging buffers are refilled by every pass: allocated as inference tensors (a solve under
    torch.inference_mode()), a later read of codes outside it could not write them. Not yet run on a GPU."""
    scores, c, r, ref = problem
    with torch.inference_mode():
        res = sinkhorn_assign_stream(scores, EPS, sample_weights=c, cluster_weights=r, tol=None, max_iter=ITERS,
                                     device="cuda", memory_budget=budget_for(37))  # fmt: skip
    assert_close(res.codes, ref.codes, atol=1e-5, what="codes")


def test_output_arrays_sharing_memory_with_an_input_are_refused():
    """An output array that is (a view of) the scores or features in memory was written while the last pass still
    read them: the codes came back wrong and the caller's scores destroyed, with no error. Refused now, as an output
    path that is an input file is; an output beside the input in one buffer (no element shared) is fine."""
    s = random_problem(40, 5, seed=3).numpy()
    kept = s.copy()
    with pytest.raises(ValueError, match="codes_out shares memory with scores"):
        sinkhorn_assign_stream(s, 0.1, codes_out=s)
    with pytest.raises(ValueError, match="codes_out shares memory with scores"):  # torch tensors too
        sinkhorn_assign_stream(torch.from_numpy(s), 0.1, codes_out=torch.from_numpy(s))
    z = np.random.default_rng(0).standard_normal((40, 5)).astype(np.float32)
    with pytest.raises(ValueError, match="codes_out shares memory with features"):
        sinkhorn_assign_stream(features=z, prototypes=z[:5], epsilon=0.5, codes_out=z)
    both = np.zeros((40, 10), np.float32)
    with pytest.raises(ValueError, match="codes_out shares memory with labels_out"):
        sinkhorn_assign_stream(s, 0.1, labels_out=both.view(np.int64)[:, 0], codes_out=both[:, 1:6])
    assert np.array_equal(s, kept)
    side = np.concatenate([s, np.zeros_like(s)], axis=1)  # scores and codes side by side, disjoint
    res = sinkhorn_assign_stream(side[:, :5], 0.1, codes_out=side[:, 5:])
    assert np.array_equal(side[:, :5], kept) and np.array_equal(side[:, 5:], res.codes.numpy())


def test_outputs_never_overwrite_inputs_nor_stay_half_written(tmp_path):
    """An output path that is an input file is refused before anything is written (it used to crash the memory-
    mapped read and leave the scores overwritten by labels); a solve that fails leaves no output file behind."""
    s = random_problem(40, 5, seed=3).numpy()
    scores_path = tmp_path / "scores.npy"
    np.save(scores_path, s)
    z_path, c_path = tmp_path / "z.npy", tmp_path / "c.npy"
    np.save(z_path, np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32))
    np.save(c_path, np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="same file as scores"):
        sinkhorn_assign_stream(scores_path, 0.1, labels_out=scores_path)
    with pytest.raises(ValueError, match="same file as scores"):  # by its memmap, too
        sinkhorn_assign_stream(np.load(scores_path, mmap_mode="r"), 0.1, codes_out=str(scores_path))
    with pytest.raises(ValueError, match="same file as features"):
        sinkhorn_assign_stream(features=z_path, prototypes=c_path, epsilon=0.5, codes_out=z_path)
    with pytest.raises(ValueError, match="same file as labels_out"):
        sinkhorn_assign_stream(scores_path, 0.1, labels_out=tmp_path / "o.npy", codes_out=tmp_path / "o.npy")
    assert np.array_equal(np.load(scores_path), s) and not (tmp_path / "o.npy").exists()
    # Weights and a warm start memory-mapped from their files are inputs too: a labels_out naming one replaced it
    # with labels without a word (the command line refuses --out over --cluster-weights).
    for name, value in (("cluster_weights", np.full(5, 0.2)), ("sample_weights", np.full(40, 0.025)),
                        ("init", np.zeros(5, np.float32))):  # fmt: skip
        np.save(tmp_path / "kept.npy", value)
        with pytest.raises(ValueError, match=f"labels_out .* is the same file as {name}"):
            sinkhorn_assign_stream(s, 0.1, labels_out=tmp_path / "kept.npy",
                                   **{name: np.load(tmp_path / "kept.npy", mmap_mode="r")})  # fmt: skip
        assert np.array_equal(np.load(tmp_path / "kept.npy"), value), name
    (tmp_path / "kept.npy").unlink()

    bad = s.copy()
    bad[7, 2] = np.nan
    np.save(scores_path, bad)
    # NaN found while streaming; a bad warm start
    for kwargs, error in ((dict(), r"scores contain NaN \(first at index \(7, 2\)"),
                          (dict(init=torch.zeros(3)), r"init must have shape \(5,\)")):  # fmt: skip
        with pytest.raises(ValueError, match=error):
            sinkhorn_assign_stream(scores_path, 0.1, labels_out=tmp_path / "l.npy", codes_out=tmp_path / "q.npy",
                                   **kwargs)  # fmt: skip
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy", "scores.npy", "z.npy"], kwargs


def test_an_output_memmap_hard_linked_to_an_input_is_refused(tmp_path):
    """A memmap output opened through a hard link to the scores file passed the check (paths differ, even resolved)
    and its codes were written over the scores as they were read. A path output that is such a link is renamed into
    place, leaving the scores under their own name: that stays allowed."""
    s = random_problem(40, 5, seed=3).numpy()
    scores_path, link = tmp_path / "scores.npy", tmp_path / "link.npy"
    np.save(scores_path, s)
    os.link(scores_path, link)
    with pytest.raises(ValueError, match="codes_out .*link.npy' is the same file as scores"):
        sinkhorn_assign_stream(scores_path, 0.1, codes_out=np.load(link, mmap_mode="r+"))
    assert np.array_equal(np.load(scores_path), s)
    res = sinkhorn_assign_stream(scores_path, 0.1, codes_out=link)
    assert np.array_equal(np.load(scores_path), s) and np.array_equal(np.load(link), res.codes.numpy())


def test_a_masked_memmap_output_of_an_input_file_is_refused(tmp_path):
    """A masked array output with nothing masked is written through its data: over a memmap of the scores file, the
    scores were replaced by codes without a word (the file check looks for a memmap, which the masked array is not),
    where the memmap itself is refused."""
    s = random_problem(40, 5, seed=3).numpy()
    scores_path = tmp_path / "scores.npy"
    np.save(scores_path, s)
    for scores in (scores_path, np.load(scores_path, mmap_mode="r")):
        codes = np.ma.masked_array(np.load(scores_path, mmap_mode="r+"))
        with pytest.raises(ValueError, match="codes_out .*scores.npy' is the same file as scores"):
            sinkhorn_assign_stream(scores, 0.1, codes_out=codes)
        assert np.array_equal(np.load(scores_path), s)


def test_a_warm_start_from_a_saved_potentials_file(tmp_path):
    """Potentials saved with np.save warm-start a streamed solve once loaded; the path itself, which the scores may
    be, was refused as "got str" with no word of what to pass instead."""
    s = random_problem(40, 5, seed=3).numpy()
    first = sinkhorn_assign_stream(s, 0.1, tol=1e-6)
    np.save(tmp_path / "b.npy", first.cluster_potentials.numpy())
    res = sinkhorn_assign_stream(s, 0.1, tol=1e-6, init=np.load(tmp_path / "b.npy", mmap_mode="r"))
    assert res.n_iter <= 2 and torch.equal(res.labels, first.labels)
    for path in (tmp_path / "b.npy", str(tmp_path / "b.npy")):
        with pytest.raises(TypeError, match=r"init must be .*got the path .*b\.npy'\. .*first: np\.load\(path\)"):
            sinkhorn_assign_stream(s, 0.1, init=path)


@pytest.mark.parametrize("budget", [0, -5, 2.5, True])
def test_memory_budget_must_be_a_positive_integer(budget):
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        sinkhorn_assign_stream(random_problem(20, 3, seed=1).numpy(), 0.1, memory_budget=budget)


def test_memory_budget_takes_a_size_as_the_command_line_does():
    """memory_budget="512M" was refused by the API ("a positive number of bytes") though --memory-budget 512M is how
    the command line takes it. A size is read as there (powers of 1024); one that is not a size says so."""
    from otlabel.streaming import chunk_bytes

    cpu = torch.device("cpu")
    for text, size in (("512M", 512 << 20), ("1.5GiB", 3 << 29), (" 64k ", 64 << 10), ("1000000", 1_000_000)):
        assert chunk_bytes(text, cpu) == chunk_bytes(size, cpu), text
    s = random_problem(20, 3, seed=1).numpy()
    assert torch.equal(sinkhorn_assign_stream(s, 0.1, memory_budget="1K").labels, sinkhorn_assign(s, 0.1).labels)
    for text, words in (
        ("lots", r"not a size: 'lots'"),
        ("-1G", "memory budget must be positive"),
        ("0M", "memory budget must be positive"),
    ):
        with pytest.raises(ValueError, match=rf"^memory_budget: {words}"):
            sinkhorn_assign_stream(s, 0.1, memory_budget=text)


@pytest.mark.parametrize("budget", [1, np.int64(1 << 20)])
def test_memory_budget_takes_any_positive_integer(budget):
    s = random_problem(20, 3, seed=1).numpy()
    assert torch.equal(sinkhorn_assign_stream(s, 0.1, memory_budget=budget).labels, sinkhorn_assign(s, 0.1).labels)


def test_a_tiny_memory_budget_is_warned_about():
    """memory_budget=1 made every chunk one sample: a pass of 20,000 x 50 scores took 0.66 s instead of 5 ms, with
    no word. Many chunks of few scores now get a SmallChunksWarning naming a budget that is enough; a small problem
    in a few small chunks (as the tests here do on purpose) and the default budget get none."""
    from otlabel.streaming import SmallChunksWarning

    s = random_problem(2000, 3, seed=1).numpy()
    with pytest.warns(SmallChunksWarning, match=r"of 1 byte cuts the 2,000 samples into 2,000 chunks of 1 \(3 scores "
                                                r"each\).*Give a budget of 1 MiB or more, or none at all"):  # fmt: skip
        res = sinkhorn_assign_stream(s, 0.1, memory_budget=1)
    assert torch.equal(res.labels, sinkhorn_assign(s, 0.1, acceleration="anderson").labels)  # slow, not wrong
    z = np.random.default_rng(2).standard_normal((3000, 16)).astype(np.float32)
    with pytest.warns(SmallChunksWarning, match=r"chunks of 1 \(4 scores each\)"):
        sinkhorn_assign_stream(features=z, prototypes=z[:4], bias=np.zeros(4), tol=None, max_iter=1,
                               memory_budget=budget_for(1, 8))  # fmt: skip
    with pytest.warns(SmallChunksWarning, match=r"chunks of 1 \(8 scores each\)"):  # 2 heads of 4
        sinkhorn_assign_stream(features=z, prototypes=np.stack([z[:4], z[4:8]]), tol=None, max_iter=1,
                               memory_budget=500)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallChunksWarning)
        sinkhorn_assign_stream(s, 0.1)  # the default
        sinkhorn_assign_stream(s, 0.1, memory_budget=1 << 20)  # the budget the warning asks for
        sinkhorn_assign_stream(s[:60], 0.1, memory_budget=1)  # 60 one-sample chunks: milliseconds
        enough = BYTES_PER_ENTRY * 5 * 820 * torch.get_num_threads()  # chunks of 4,100 scores
        sinkhorn_assign_stream(random_problem(20000, 5, seed=3).numpy(), tol=None, max_iter=1, memory_budget=enough)


def test_a_tiny_memory_budget_is_warned_about_in_a_sharded_solve_too():
    """Streamed features on a rank run the same chunks: the same warning, pointing at the caller's line."""
    from otlabel import SmallChunksWarning, sinkhorn_assign_sharded

    z = np.random.default_rng(2).standard_normal((3000, 16)).astype(np.float32)
    with pytest.warns(SmallChunksWarning, match=r"chunks of 1 \(4 scores each\)") as seen:
        sinkhorn_assign_sharded(features=z, prototypes=z[:4], epsilon=0.5, tol=None, max_iter=1, memory_budget=1)
    assert seen[0].filename == __file__


@pytest.mark.parametrize("device, words", [("bogus", "'cpu', 'cuda' or 'cuda:N'"), ("meta", "'cpu', 'cuda'")]
                         + ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")]))  # fmt: skip
def test_stream_device_is_checked(device, words):
    with pytest.raises(ValueError, match=words):
        sinkhorn_assign_stream(random_problem(20, 3, seed=1).numpy(), 0.1, device=device)


def test_bad_features_are_named_as_features():
    """A NaN in a features row makes that row's scores NaN: the error names the features row (it named column 0 of
    the scores), and a non-finite bias is refused up front."""
    z, c = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32), np.eye(4, 8, dtype=np.float32)
    z[29, 3] = np.nan
    with pytest.raises(ValueError, match=r"features row 29 contains NaN or inf"):
        sinkhorn_assign_stream(features=z, prototypes=c, memory_budget=budget_for(7))
    with pytest.raises(ValueError, match=r"bias contains NaN or \+inf"):
        sinkhorn_assign_stream(features=np.nan_to_num(z), prototypes=c, bias=np.array([0, 1, np.inf, 0]))


def test_small_epsilon_converges_as_in_memory():
    """The streamed pass rounds S / eps + b to float32; at eps = 0.002 (|S| / eps ~ 1000) that rounding moved with b
    and the error stalled at 3.5e-6 (3000 iterations, not converged) where the in-memory solve reached tol = 1e-6
    in 346. With a fixed per-cluster reference (LogDomainOperator) it converges in about as many."""
    scores = torch.randn(2000, 50, generator=torch.Generator().manual_seed(0))
    ref = sinkhorn_assign(scores, 0.002, tol=1e-6, max_iter=3000)
    res = sinkhorn_assign_stream(scores.numpy(), 0.002, tol=1e-6, max_iter=3000)
    assert ref.converged and res.converged and res.n_iter < 2 * ref.n_iter
    assert torch.equal(res.labels, ref.labels)


def test_float32_error_floor_as_in_memory():
    """The cluster sums of a chunk were one float32 product over all its rows, its rounding growing with their count:
    on 3,000 x 40 cosine scores at eps 0.05 (two ranges of 1,500 rows) the streamed error stalled at 1.2e-6, features
    alike, where the in-memory solve reached 1.4e-7; tol = 1e-6 did not converge. Products of 64 rows summed in
    float64 reach ~4e-8. Two heads: their rows in whole tiles are multiplied head by head, the last 28 together."""
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(3000, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(2, 40, 16, generator=g), dim=2)
    scores = (z @ c.transpose(1, 2)).numpy()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two ranges of 1,500 rows, however many cores the machine has
    try:
        kw = dict(epsilon=0.05, tol=2e-7, max_iter=300, warn=False)
        solves = {
            "scores": sinkhorn_assign_stream(scores[0], **kw),
            "two heads": sinkhorn_assign_stream(scores, **kw),
            "features": sinkhorn_assign_stream(features=z.numpy(), prototypes=c[0].numpy(), **kw),
            "in-memory features": sinkhorn_assign(features=z, prototypes=c[0], **kw),
        }
    finally:
        torch.set_num_threads(threads)
    for what, res in solves.items():
        assert res.converged and res.marginal_error < 2e-7, f"{what}: {res.marginal_error:.3g}"
    ref = sinkhorn_assign(torch.from_numpy(scores[0]), 0.05, tol=1e-6)
    assert torch.equal(solves["scores"].labels, ref.labels)


def test_default_tol_with_few_clusters():
    """A chunk holds as many rows as a million scores: 500,000 at K = 2, summed in one float32 product. Their
    rounding gave 400,000 x 2 scores a marginal error that never went below ~7e-4 (1,000,000 x 2: 1.2e-3), so the
    default tol = 1e-4 was never reached; products of 64 rows summed in float64 converge in a few iterations."""
    scores = random_problem(400_000, 2, seed=3).numpy()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two ranges of 200,000 rows, each one chunk
    try:
        res = sinkhorn_assign_stream(scores, 0.05, max_iter=50, warn=False)
    finally:
        torch.set_num_threads(threads)
    assert res.converged and res.marginal_error < 1e-4, f"{res.marginal_error:.3g} after {res.n_iter} iterations"


def test_fast_exp_matches_exp():
    """The log-domain passes exponentiate through ``exp_`` (exp2 on the CPU: torch's float32 exp took 7-34 ns per
    underflowing entry, 0.75 ns otherwise, a 5x slower streamed solve on logits at eps 0.02)."""
    from otlabel.backends.torch_backend import exp_

    x = torch.cat([-torch.rand(100_000) * 87, torch.tensor([0.0, -88.0, -150.0, float("-inf")])])
    got, want = exp_(x.clone()), x.double().exp()
    assert got[-1] == 0 and got[-4] == 1 and bool((got[-3:-1] < 1e-37).all())
    assert float(((got[:-4].double() - want[:-4]) / want[:-4]).abs().max()) < 1e-5
    out = torch.empty_like(x)  # into a given tensor, as the cached kernel is built
    assert exp_(x.clone(), out=out) is out and torch.equal(out, got)


class Interrupted(BaseException):
    """Raised by the test's signal handler in the main thread, as Ctrl-C raises KeyboardInterrupt."""


def counting_reads(monkeypatch, on_read=None):
    """Patch the host reads of streamed chunks: returns the list of chunk starts read; ``on_read(count)`` is called
    (in the reading worker thread) after each read."""
    import otlabel.host_sources as host_sources

    reads, real_get = [], host_sources.HostStream.get

    def get(self, rows):
        reads.append(rows.start)
        if on_read is not None:
            on_read(len(reads))
        return real_get(self, rows)

    monkeypatch.setattr(host_sources.HostStream, "get", get)
    return reads


def test_an_interrupt_stops_the_workers_mid_pass(monkeypatch):
    """Ctrl-C (or SIGTERM) in the main thread raised there at once, but the CPU workers read on to the end of the
    pass, and the process could not exit before they did: 75 s after Ctrl-C for the command line on 200,000 x 100
    scores in 1-sample chunks, a pass's worth of disk reads on a file larger than RAM. They now stop at their next
    chunk."""
    import signal
    import threading
    import time

    def interrupt_mid_pass(count):  # not at the start: a signal landing just before the main thread blocks in its
        if count == 500:  # wait (a lock) is handled only when the lock is released, at the end of the pass (CPython)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    reads = counting_reads(monkeypatch, interrupt_mid_pass)
    previous = signal.signal(signal.SIGUSR1, lambda *_: (_ for _ in ()).throw(Interrupted()))
    try:
        with warnings.catch_warnings(), pytest.raises(Interrupted):
            warnings.simplefilter("ignore")  # 1-sample chunks: a SmallChunksWarning
            sinkhorn_assign_stream(random_problem(4000, 3, seed=1).numpy(), 0.1, memory_budget=budget_for(1, 3))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    seen = -1
    while len(reads) != seen:  # until the workers have stopped reading (or the pass is over)
        seen = len(reads)
        time.sleep(0.2)
    # 500-680 in 60 runs (loaded or not): the signal takes a moment. Workers that read on would reach 4,000.
    assert seen < 2000, f"{seen} chunks read of the 4,000 of a pass"


def test_an_error_in_the_first_rows_does_not_wait_for_the_other_ranges(monkeypatch):
    """A NaN in row 3 ended the first thread's range at once, but the error was raised only once the other threads
    had read their ranges to the end: 8 s of a 21 s pass on 200,000 x 100 scores in 10-sample chunks on 2 threads.
    The ranges after a failed one now stop at their next chunk; the error still names the first bad sample."""
    scores = random_problem(2000, 3, seed=1).numpy()
    scores[3, 1] = np.nan
    reads = counting_reads(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two ranges of rows: [0, 1000) and [1000, 2000)
    try:
        with warnings.catch_warnings(), pytest.raises(ValueError, match=r"NaN \(first at index \(3, 1\)"):
            warnings.simplefilter("ignore")  # 1-sample chunks: a SmallChunksWarning
            sinkhorn_assign_stream(scores, 0.1, memory_budget=2 * budget_for(1, 3))
    finally:
        torch.set_num_threads(threads)
    assert len(reads) < 200, f"{len(reads)} chunks read of the 2,000 of a pass"
    scores[3, 1], scores[1500, 2] = 0.0, np.nan  # an error in a later range is reported the same
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"NaN \(first at index \(1500, 2\)"):
        warnings.simplefilter("ignore")
        sinkhorn_assign_stream(scores, 0.1, memory_budget=2 * budget_for(1, 3))


def test_log_c_is_computed_once_not_by_each_worker(monkeypatch):
    """``log c`` became lazy (formed on first use): first used inside the row ranges' workers, every worker found it
    missing and computed its own N-float copy at once (seen: 2 of 3 runs of a 2,000,000-sample streamed solve on 2
    threads). The passes now form it once on the caller's thread, before handing out the ranges: streaming's cold
    start (its checked pass) and the exact log-sum-exp pass (LogDomainOperator's, here on the streamed operator)."""
    import threading
    import time

    from otlabel.backends import torch_backend

    computed, real = [], torch_backend.LogDomainOperator.log_c.fget

    def log_c(self):
        if self._log_c is None:
            computed.append(threading.current_thread().name)
            time.sleep(0.05)  # a computation as long as on millions of samples: every racing worker joins in
        return real(self)

    monkeypatch.setattr(torch_backend.LogDomainOperator, "log_c", property(log_c))
    scores = random_problem(400, 3, seed=1).numpy()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two ranges of rows
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small chunks
            res = sinkhorn_assign_stream(scores, 0.5, max_iter=2, tol=None, memory_budget=budget_for(10, 3))
            assert len(computed) == 1, f"cold start: log c computed {len(computed)} times, on {computed}"
            operator = res._operator
            operator._log_c = None
            computed.clear()
            operator._cluster_lse_exact(torch.zeros(1, 3, dtype=operator.dtype))
    finally:
        torch.set_num_threads(threads)
    assert len(computed) == 1, f"exact pass: log c computed {len(computed)} times, on {computed}"


@pytest.mark.parametrize("threads", [1, 3])
def test_the_cpu_budget_is_shared_by_the_threads(threads):
    """On the CPU every thread has a chunk in flight: a budget of B bytes gives chunks of B / threads bytes (at least
    one, at most CPU_CHUNK_BYTES), so the pass's working set stays within B. Nothing checked the division: a chunk
    of the whole budget per thread solves the same problem, in threads x the memory."""
    from otlabel.streaming import CPU_CHUNK_BYTES, chunk_bytes

    cpu, saved = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert chunk_bytes(3 * 2**20, cpu) == 3 * 2**20 // threads
        assert chunk_bytes(1, cpu) == 1
        assert chunk_bytes(2**40, cpu) == CPU_CHUNK_BYTES
    finally:
        torch.set_num_threads(saved)


def test_a_read_out_after_raising_the_thread_count_stays_within_the_budget(monkeypatch):
    """The chunks are sized for the threads of the solve (a budget of B on 2 threads: chunks of B / 2), and the
    read-outs' passes split the rows over the threads of the moment: after ``torch.set_num_threads(8)`` reading
    ``res.objective`` made 8 ranges with two float64 buffers a chunk each, 4x the budget (measured in RSS: 128 MiB
    for a 32 MiB budget; 179 MiB at 16 threads after a solve on 1). A pass now makes at most as many ranges as the
    budget holds chunks, so the read-out is also the one the solve's thread count gives, bit for bit."""
    from otlabel.backends.torch_backend import LogDomainOperator

    buffers, real = [], LogDomainOperator.work_buffer

    def work_buffer(self, lo, hi, dtype=None):
        rows = next(iter(self.chunks(lo, hi)))  # the buffer holds the range's first chunk
        itemsize = torch.empty(0, dtype=dtype or self.dtype).element_size()
        buffers.append((rows.stop - rows.start) * self.n_heads * self.n_clusters * itemsize)
        return real(self, lo, hi, dtype)

    scores = random_problem(4000, 100, seed=2).numpy()
    budget = 2 * budget_for(300, k=100)  # chunks of 300 samples on 2 threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = [sinkhorn_assign_stream(scores, 0.5, max_iter=3, tol=None, memory_budget=budget) for _ in range(2)]
        want = results[0].objective
        monkeypatch.setattr(LogDomainOperator, "work_buffer", work_buffer)
        torch.set_num_threads(8)
        got = results[1].objective
    finally:
        torch.set_num_threads(threads)
    assert sum(buffers) <= budget, f"{len(buffers)} buffers of {sum(buffers):,} bytes in all; the budget is {budget:,}"
    assert got == want


def small_chunks_warned(n: int, rows: int, memory_budget=1, k: int = 4) -> bool:
    """Whether ``n`` samples of ``k`` scores in chunks of ``rows`` get a SmallChunksWarning."""
    from otlabel.streaming import SmallChunksWarning, warn_if_chunks_too_small

    src = HostSource(np.zeros((n, k), np.float32), "cpu", rows_per_chunk=rows)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warn_if_chunks_too_small(src, memory_budget, torch.device("cpu"))
    return any(issubclass(w.category, SmallChunksWarning) for w in seen)


def test_small_chunks_are_warned_about_past_both_bounds_only():
    """Warned: more than MANY_CHUNKS chunks, each of fewer than MIN_CHUNK_ENTRIES scores, and a budget given; at
    either bound, not. The tests above stayed far from the bounds (chunks of one sample, or the default budget)."""
    from otlabel.streaming import MANY_CHUNKS, MIN_CHUNK_ENTRIES

    assert small_chunks_warned(MANY_CHUNKS + 1, 1) and not small_chunks_warned(MANY_CHUNKS, 1)
    assert small_chunks_warned(10 * MANY_CHUNKS + 1, 10) and not small_chunks_warned(10 * MANY_CHUNKS, 10)
    rows = MIN_CHUNK_ENTRIES // 4  # K = 4: chunks of exactly MIN_CHUNK_ENTRIES scores, or 4 fewer
    assert small_chunks_warned((MANY_CHUNKS + 1) * (rows - 1), rows - 1)
    assert not small_chunks_warned((MANY_CHUNKS + 1) * rows, rows)
    assert not small_chunks_warned(MANY_CHUNKS + 1, 1, memory_budget=None)  # the default budget is never warned about


@pytest.mark.parametrize("threads, suggested", [(1, 7), (3, 19)])
def test_the_budget_a_small_chunks_warning_suggests(threads, suggested):
    """The warning's budget gives chunks of GOOD_CHUNK_ENTRIES scores: 4,096 samples of K = 4 (fewer than the
    5,000), each costing 4 x 16 bytes of scores and 3 x 128 x 4 of features, per thread: 6.25 MiB a thread, rounded
    up. Every test before suggested 1 MiB (the least it can say), so the formula went unchecked."""
    from otlabel.streaming import SmallChunksWarning, chunk_bytes, warn_if_chunks_too_small

    cpu, saved = torch.device("cpu"), torch.get_num_threads()
    z, c = np.zeros((5000, 128), np.float32), np.eye(4, 128, dtype=np.float32)
    torch.set_num_threads(threads)
    try:
        src = FeatureSource(z, c, device="cpu", memory_budget=chunk_bytes(1, cpu))  # 1-sample chunks
        with pytest.warns(SmallChunksWarning, match=rf"Give a budget of {suggested} MiB or more, or none at all "
                                                    r"\(the default: 256 MiB on the CPU\)"):  # fmt: skip
            warn_if_chunks_too_small(src, 1, cpu)
        enough = FeatureSource(z, c, device="cpu", memory_budget=chunk_bytes(suggested * 2**20, cpu))
        assert enough.rows_per_chunk >= 4096
        with warnings.catch_warnings():
            warnings.simplefilter("error", SmallChunksWarning)
            warn_if_chunks_too_small(enough, suggested * 2**20, cpu)
    finally:
        torch.set_num_threads(saved)


def test_outputs_that_cannot_be_written_are_refused():
    """A read-only array or something that is no array at all: each refused with its own message (no test reached
    them; a returned, not raised, read-only error surfaced as "must be a path, a numpy array or a torch tensor")."""
    s = np.zeros((50, 3), np.float32)
    frozen = np.zeros(50, np.int64)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="labels_out is read-only; pass a writable array or a path"):
        sinkhorn_assign_stream(s, labels_out=frozen)
    with pytest.raises(TypeError, match="codes_out must be a path, a numpy array or a torch tensor, got list"):
        sinkhorn_assign_stream(s, codes_out=[0.0] * 150)
    # In non-native byte order (torch said only "Conversion between byte orders is currently not supported"):
    for name, out in (("labels_out", np.zeros(50, ">i8")), ("codes_out", np.zeros((50, 3), ">f4"))):
        fix = r"np\.empty\(\(50,\), np\.int64\)" if name == "labels_out" else r"np\.empty\(\(50, 3\), np\.float32\)"
        says = rf"{name} is \w+ in non-native byte order \(.*\), .*: allocate it as {fix}"
        with pytest.raises(TypeError, match=says):
            sinkhorn_assign_stream(s, **{name: out})


def test_numpy_outputs_torch_cannot_write_into_say_what_to_pass():
    """A big-endian labels_out raised torch's "given numpy array has byte order different from the native byte order"
    (naming no output), a reversed view its "negative strides are not currently supported ... make a copy" (a copy
    would be written, not the caller's array), and a masked array was written under its mask, the labels hidden."""
    s2 = random_problem(12, 3, seed=9).numpy()
    masked = np.ma.masked_array(np.zeros(12, np.int64), mask=np.ones(12, bool))
    swapped, reversed_codes = np.zeros(12, ">i8"), np.zeros((12, 3), np.float32)[::-1]
    for kwargs, error, says in (
        (dict(labels_out=swapped), TypeError, r"^labels_out is int64 in non-native byte order \(>i8\).*np\.empty"),
        (dict(codes_out=reversed_codes), ValueError, r"^codes_out is a NumPy view with a negative stride"),
        (dict(labels_out=masked), TypeError, r"^labels_out is a NumPy masked array.*np\.empty\(\(12,\), np\.int64\)"),
    ):
        with pytest.raises(error, match=says):
            sinkhorn_assign_stream(s2, **kwargs)


def test_masked_array_outputs_with_nothing_masked_are_written():
    """A NumPy masked array output was refused whatever its mask ("what is written under its mask would stay hidden"),
    also with no mask (np.ma.nomask) or one that hides nothing: there every result shows, so it is written. One that
    hides entries is still refused, with the fix that clears its mask (softened first, for a hard mask), which works."""
    s2 = random_problem(12, 3, seed=12).numpy()
    kw = dict(tol=None, max_iter=5)
    ref = sinkhorn_assign_stream(s2, **kw)
    for mask in (np.ma.nomask, False):
        labels = np.ma.masked_array(np.zeros(12, np.int64), mask=mask)
        codes = np.ma.masked_array(np.zeros((12, 3), np.float32), mask=mask)
        sinkhorn_assign_stream(s2, labels_out=labels, codes_out=codes, **kw)
        assert np.array_equal(labels, ref.labels.numpy()) and np.array_equal(codes, ref.codes.numpy())
        assert not np.ma.is_masked(labels) and not np.ma.is_masked(codes)
    for hard in (False, True):
        labels = np.ma.masked_array(np.zeros(12, np.int64), mask=np.arange(12) < 2, hard_mask=hard)
        with pytest.raises(TypeError, match=r"^labels_out is a NumPy masked array with 2 masked entries") as e:
            sinkhorn_assign_stream(s2, labels_out=labels, **kw)
        clear = re.search(r"clear its mask first \((.*)\)\.$", str(e.value))[1]
        exec(clear.replace(", then ", "; "), {"np": np, "labels_out": labels})
        sinkhorn_assign_stream(s2, labels_out=labels, **kw)
        assert np.array_equal(labels, ref.labels.numpy()) and not np.ma.is_masked(labels)


def test_reading_codes_later_leaves_a_reused_labels_out_alone():
    """A result read its codes lazily with a pass that wrote its labels into the caller's labels_out again: a buffer
    reused for the next solve (one per epoch) got the older solve's labels back over the newer's."""
    g = torch.Generator().manual_seed(5)
    first, second = torch.randn(300, 7, generator=g), torch.randn(300, 7, generator=g)
    buffer = np.empty(300, np.int64)
    old = sinkhorn_assign_stream(first.numpy(), 0.1, labels_out=buffer)
    old_labels = buffer.copy()
    sinkhorn_assign_stream(second.numpy(), 0.1, labels_out=buffer)  # the buffer's labels: the newer solve's
    new_labels = buffer.copy()
    assert not np.array_equal(old_labels, new_labels)
    codes = old.codes
    assert np.array_equal(buffer, new_labels)
    assert np.array_equal(codes.argmax(dim=1).numpy(), old_labels)


def test_outputs_whose_rows_overlap_are_refused(monkeypatch):
    """An output whose rows overlap (as_strided with a row stride below the row's length) was written without a word,
    each chunk's codes overwriting the last one's (rows summing to 0.002 or 1.001): only a stride of 0 was refused.
    Refused before anything is written, tensor or array; layouts whose entries are apart are written as given, those
    whose strides interleave (2 and 21 for 20 x 4) too, their offsets compared (refused as unsettled beyond
    MAX_COMPARED_OFFSETS entries)."""
    s2 = random_problem(20, 4, seed=11)
    kw = dict(tol=None, max_iter=5, memory_budget=budget_for(7, k=4))
    ref = sinkhorn_assign_stream(s2, **kw)
    buffer = torch.zeros(44)
    overlapping = torch.as_strided(buffer, (20, 4), (2, 1))
    as_array = np.lib.stride_tricks.as_strided(buffer.numpy(), (20, 4), (8, 4))
    for out in (overlapping, as_array):
        with pytest.raises(ValueError, match=r"^codes_out has entries that share memory \(strides of \(2, 1\) entries"):
            sinkhorn_assign_stream(s2, codes_out=out, **kw)
    assert not buffer.any()  # nothing written
    interleaved = torch.as_strided(torch.zeros(102), (20, 4), (2, 21))
    for out in (interleaved, torch.zeros(4, 20).t(), torch.zeros(20, 8)[:, ::2]):
        res = sinkhorn_assign_stream(s2, codes_out=out, **kw)
        assert torch.equal(out, ref.codes) and torch.equal(res.codes, ref.codes), out.stride()
    monkeypatch.setattr(streaming, "MAX_COMPARED_OFFSETS", 79)  # too many offsets to compare: said to be unsettled
    with pytest.raises(ValueError, match=r"^codes_out may have entries that share memory \(strides of \(2, 21\)"):
        sinkhorn_assign_stream(s2, codes_out=interleaved, **kw)


def test_outputs_torch_refuses_to_write_in_place_are_refused_first():
    """After the whole solve, an output whose entries share memory (expand, a stride of 0) raised torch's "more than one
    element of the written-to tensor refers to a single memory location. Please clone() the tensor", and one made
    under torch.inference_mode() its "Inplace update to inference tensor outside InferenceMode ... make a clone": a
    clone would be written, not the caller's output. Both are refused before the solve; an inference tensor is
    written inside inference mode, where torch allows it."""
    s2 = random_problem(12, 3, seed=10).numpy()
    shared = np.lib.stride_tricks.as_strided(np.zeros(3, np.float32), shape=(12, 3), strides=(0, 4), writeable=True)
    with torch.inference_mode():
        made_there = torch.zeros(12, dtype=torch.int64)
    for kwargs, says in (
        (dict(labels_out=torch.zeros(1, dtype=torch.int64).expand(12)), r"^labels_out has entries that share memory"),
        (dict(codes_out=shared), r"^codes_out has entries that share memory .*np\.empty\(\(12, 3\), np\.float32\)"),
        (dict(labels_out=made_there), r"^labels_out is an inference tensor .* torch\.inference_mode\(\)"),
    ):
        with pytest.raises(ValueError, match=says):
            sinkhorn_assign_stream(s2, **kwargs)
    with torch.inference_mode():
        res = sinkhorn_assign_stream(s2, tol=None, max_iter=3, labels_out=made_there)
    assert torch.equal(made_there, res.labels) and made_there.bincount(minlength=3).min() > 0
    # codes read outside the mode, as the library allows after a solve inside it: their pass wrote the labels into
    # labels_out again, and torch refused ("Inplace update to inference tensor outside InferenceMode")
    assert torch.equal(res.codes.argmax(dim=1), res.labels) and torch.equal(made_there, res.labels)


def test_codes_out_over_a_wide_span():
    """codes_out is written by a softmax in place: shifted by each row's maximum, it cannot overflow where the scores
    span far more than 88 nats at this epsilon (the tests before used spans of a few nats, where any shift works)."""
    scores = random_problem(200, 5, seed=7)
    scores = scores / scores.abs().max()  # |S| <= 1: a span of up to 200 nats at eps 0.01
    ref = sinkhorn_assign(scores, 0.01, tol=None, max_iter=20)
    codes = np.full((200, 5), np.nan, np.float32)
    sinkhorn_assign_stream(scores.numpy(), 0.01, tol=None, max_iter=20, codes_out=codes)
    assert_close(torch.from_numpy(codes), ref.codes, atol=1e-5, what="codes_out at eps 0.01")


@pytest.mark.parametrize("free_gib, budget_mib", [(1, 256), (6, 1536), (8, 2048), (64, 2048)])
def test_the_default_cuda_budget(monkeypatch, free_gib, budget_mib):
    """On CUDA the default budget is a quarter of the free device memory, at most 2 GiB (asked of the device, so no
    test without a GPU reached it: the 1/4 and the cap were unchecked)."""
    from otlabel.host_sources import default_memory_budget

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_gib * 2**30, 80 * 2**30))
    assert default_memory_budget(torch.device("cuda")) == budget_mib * 2**20
    assert default_memory_budget(torch.device("cpu")) == 256 * 2**20


@pytest.mark.parametrize("features", [False, True])
def test_cpu_passes_run_on_every_thread(monkeypatch, features):
    """On the CPU a streamed pass splits the rows over the worker threads (the sources are views: any thread may read
    them). A source that said otherwise (random_access False) would solve the same problem on one thread, so no
    result-based test would notice: the reads are counted per thread. The first read of each of the first two threads
    waits for the other (a barrier): otherwise a worker that finished its range before the second had started took
    the second range too, and the test failed by timing alone (3 of 20 runs on a loaded machine). With one range the
    barrier breaks after its timeout and the solve fails."""
    import threading

    import otlabel.host_sources as host_sources

    readers, real_get = set(), host_sources.HostStream.get
    both_started = threading.Barrier(2, timeout=10)

    def get(self, rows):
        thread = threading.get_ident()
        if thread not in readers and len(readers) < 2:
            readers.add(thread)
            both_started.wait()
        readers.add(thread)
        return real_get(self, rows)

    monkeypatch.setattr(host_sources.HostStream, "get", get)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
        data = dict(features=z, prototypes=z[:3]) if features else dict(scores=z[:, :3])
        sinkhorn_assign_stream(**data, epsilon=0.5, tol=None, max_iter=2, memory_budget=budget_for(20, 3 + 8))
    finally:
        torch.set_num_threads(saved)
    assert len(readers) == 2, f"{len(readers)} threads read the chunks"


def test_one_score_is_a_problem_and_no_score_is_not():
    """A 1 x 1 problem is solved (one sample, one cluster); an empty one is refused. Nothing streamed one score."""
    res = sinkhorn_assign_stream(np.ones((1, 1), np.float32), 0.1)
    assert res.labels.tolist() == [0] and res.converged
    with pytest.raises(ValueError, match=r"and be non-empty, got shape \(0, 3\)"):
        sinkhorn_assign_stream(np.zeros((0, 3), np.float32), 0.1)


def test_one_bad_prototype_entry_is_refused():
    """One NaN or inf entry among finite prototypes is refused before any pass (no streamed test had bad prototypes:
    a check of "any entry finite" passed them, and the first pass then blamed "features row 0")."""
    z = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    for bad in (np.nan, np.inf):
        c = np.eye(4, 8, dtype=np.float32)
        c[2, 5] = bad
        with pytest.raises(ValueError, match="prototypes contain NaN or inf; they must be finite vectors"):
            sinkhorn_assign_stream(features=z, prototypes=c)


@pytest.mark.parametrize("warm", [False, True])
def test_every_range_counts_once_in_the_checks(warm):
    """On 2 threads the rows are checked in two ranges, whose column maxima and mask patterns are merged: half the
    samples may go to cluster 0 only, the other half fill cluster 1. Leaving the second range out (cluster 1 has
    no sample: infeasible) or counting the first twice (2/3 of the mass for cluster 0's half: infeasible) refuses a
    feasible problem. Cold start: the checks ride on the first pass; warm start: a pass of its own."""
    scores = np.zeros((8, 2), np.float32)
    scores[:4, 1] = -np.inf
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two ranges of rows: [0, 4) and [4, 8)
    try:
        init = torch.zeros(2, dtype=torch.float64) if warm else None
        res = sinkhorn_assign_stream(scores, 0.1, init=init, tol=1e-6)
    finally:
        torch.set_num_threads(threads)
    assert res.converged and res.labels.tolist() == [0] * 4 + [1] * 4


def test_the_warm_start_checks_exponentiate_nothing(monkeypatch):
    """The pass that checks the scores before a warm start needs no log-sum-exps (those serve the cold start only):
    an exp per entry there would be a wasted iteration's worth of work."""
    source = HostSource(random_problem(40, 3, seed=4).numpy(), "cpu", rows_per_chunk=7)
    op = streaming.StreamingOperator(source, 0.1, random_weights(40, 5), random_weights(3, 6))
    monkeypatch.setattr(streaming, "exp_", lambda *args, **kwargs: pytest.fail("validate() exponentiated"))
    op.validate()
    assert op.validated and op.reachable().all()


def test_the_streamed_span_check_sits_at_the_float32_limit():
    """The streamed checks see S / eps already (inv_eps=1 to the row checks): a sample whose scores reach 4000 nats
    at this epsilon is refused as in memory, one at 2000 is solved (float32 resolves up to 3000). The span tests
    elsewhere use 2e5, which a check off by a factor of 2 either way passes too."""
    scores = random_problem(30, 4, seed=8).numpy() / 100
    for shift, refused in ((40.0, True), (20.0, False)):
        shifted = scores.copy()
        shifted[17] -= shift  # eps = 0.01: |S| / eps up to 4000 or 2000 nats in row 17
        for solve in (sinkhorn_assign_stream, sinkhorn_assign):
            if refused:
                with pytest.raises(ValueError, match=r"float32 arithmetic"):
                    solve(shifted, 0.01)
            else:
                assert solve(shifted, 0.01, tol=None, max_iter=5).labels.shape == (30,)


def test_a_streamed_solve_from_a_thread_started_during_another_solve_plans_for_the_processs_threads():
    """A thread's first torch call takes the thread count last set anywhere: 1 while another CPU solve holds its own
    thread there. A streamed solve begun on such a thread sized its chunks (``memory_budget // threads``) for one
    thread, twice the budget in flight over the two workers, and rounded differently (codes 2e-6 off the same solve
    alone)."""
    import threading

    from otlabel.backends import torch_backend

    cpu, saved = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(2)
    scores = torch.randn(20000, 50, generator=torch.Generator().manual_seed(0))

    def solve():
        return sinkhorn_assign_stream(scores=scores.numpy(), epsilon=0.05, tol=1e-6, memory_budget=1 << 20)

    try:
        alone = solve()
        inside, done, out = threading.Event(), threading.Event(), {}

        def other_solve():
            with torch_backend.caller_on_one_thread(cpu):
                inside.set()
                done.wait(timeout=30)

        other = threading.Thread(target=other_solve)
        other.start()
        inside.wait(timeout=10)
        try:

            def on_a_fresh_thread():
                out["chunk"] = streaming.chunk_bytes(1 << 20, cpu)  # its first torch call
                out["result"] = solve()

            fresh = threading.Thread(target=on_a_fresh_thread)
            fresh.start()
            fresh.join(timeout=60)
        finally:
            done.set()
            other.join(timeout=10)
        assert out["chunk"] == streaming.chunk_bytes(1 << 20, cpu) == (1 << 20) // 2
        assert torch.equal(out["result"].labels, alone.labels)
        assert torch.equal(out["result"].codes, alone.codes)
    finally:
        torch.set_num_threads(saved)


class RecordingStream:
    """A stand-in for HostStream that records the chunk size it was given (and allocates nothing on the device)."""

    def __init__(self, host, device, rows_per_chunk):
        self.rows_per_chunk, self.staged = max(1, min(rows_per_chunk, host.shape[1])), device.type == "cuda"


@pytest.mark.parametrize(
    "dtype, device, bytes_per_score",
    [
        (np.float32, "cuda", 16 + 8),  # two float32 staging buffers besides the objective's two float64 buffers
        (np.float64, "cuda", 16 + 16),
        (np.float16, "cuda", 16 + 4),
        (np.float32, "cpu", 16),  # no staging: chunks are views
        (np.float64, "cpu", 16),
    ],
)
def test_chunks_staged_to_cuda_count_the_staging_buffers(monkeypatch, dtype, device, bytes_per_score):
    """Scores streamed to CUDA go through two device staging buffers in their stored dtype, which the chunk sizing
    did not count: float32 scores took 24 bytes a score reading the objective, float64 ones 24 in the iterations and
    32 there, against the 16 a budget allowed. The sizing is checked without a GPU (the stream is a stand-in)."""
    from otlabel import host_sources

    monkeypatch.setattr(host_sources, "HostStream", RecordingStream)
    scores = np.zeros((2, 5000, 50), dtype)
    budget = 1 << 20
    source = HostSource(scores, torch.device(device), memory_budget=budget)
    assert source.rows_per_chunk == budget // (bytes_per_score * 2 * 50)
    assert source.rows_per_chunk * 2 * 50 * bytes_per_score <= budget


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_streamed_cuda_solve_stays_within_its_budget(dtype):
    """Device memory of a streamed solve from host scores, iterations and objective read-out included: within the
    budget plus the N-length vectors (sample weights, log c: about 1 MiB here). Without the staging buffers counted,
    float32 scores peaked at 1.5x the budget reading the objective, float64 at 1.5x iterating and 2x there. Not yet
    run on a GPU."""
    scores = random_problem(40_000, 100, seed=3).to(dtype)  # 16-32 MB: several chunks of an 8 MiB budget
    budget = 8 << 20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    res = sinkhorn_assign_stream(scores, 0.5, max_iter=5, tol=None, device="cuda", memory_budget=budget)
    float(res.objective)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= budget + (2 << 20), f"{dtype}: peak {peak / 2**20:.2f} MiB against a budget of 8 MiB"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_scores_whose_quotient_by_epsilon_overflows_get_the_span_error(tmp_path, dtype):
    """Finite scores of 3e38 (float32) or 1.7e308 (float64) at epsilon 0.05: the streamed check sees S / eps,
    already inf, and said "scores contain +inf, or scores / epsilon overflow ... Only -inf is allowed": no fix for the
    overflow, where the dense check names the size of the scores and the shifts, float64 or a larger epsilon. The
    streamed path now reads the offending score as given and says the same; a +inf given is still named as such."""
    from otlabel.problem import ScoreSpanError

    big = 3e38 if dtype == np.float32 else 1.7e308
    scores = random_problem(30, 4, seed=7).numpy().astype(dtype)
    scores[11, 2] = big
    path = tmp_path / "s.npy"
    np.save(path, scores)
    said = r"reach (6e\+39|inf) \(a score of (3e\+38|1\.7e\+308) at index \(11, 2\).* Subtract each sample's maximum"
    with pytest.raises(ScoreSpanError, match=said) as info:
        sinkhorn_assign_stream(path, 0.05, memory_budget=budget_for(7, k=4))
    assert "+inf" not in str(info.value)
    scores[11, 2] = np.inf
    np.save(path, scores)
    with pytest.raises(
        ValueError, match=r"scores contain \+inf, or scores / epsilon overflow \(first at index \(11, 2"
    ):
        sinkhorn_assign_stream(path, 0.05, memory_budget=budget_for(7, k=4))


@pytest.mark.parametrize("layout", ["plain", "heads", "transposed"])
def test_finite_scores_whose_quotient_by_epsilon_overflows_to_minus_inf_get_the_span_error(layout):
    """The same overflow below zero: a sample whose scores are all -3e38 (float32, epsilon 0.05) is a row of -inf as
    S / eps, and the streamed check said "infeasible mask: sample 9 (head 0) has every score -inf", and with them on
    every weighted cluster "is allowed only in clusters of weight 0", where the in-memory check gives the span
    error. Now the span error, naming the score as given at its index in the caller's layout; a row of -inf given
    keeps its message."""
    from otlabel.problem import ScoreSpanError

    base = random_problem(30, 4, seed=7).numpy()
    weights = np.array([0.3, 0.3, 0.4, 0.0])
    for row, clusters, message in ((9, slice(None), "has every score -inf"), (12, slice(0, 3), "weight 0")):
        for value in (-3e38, -np.inf):
            scores = base.copy()
            scores[row, clusters] = value
            given, index = scores, f"({row}, 0)"
            if layout == "heads":
                given, index = np.stack([base, scores]), f"(1, {row}, 0)"
            if layout == "transposed":
                given = np.ascontiguousarray(scores.T).T  # (N, K) with (1, N) strides
            if value == -np.inf:
                with pytest.raises(ValueError, match=f"sample {row} .*{message}"):
                    sinkhorn_assign_stream(given, 0.05, cluster_weights=weights)
                continue
            said = rf"reach 6e\+39 \(a score of -3e\+38 at index {re.escape(index)} .* Subtract each sample's maximum"
            with pytest.raises(ScoreSpanError, match=said):
                sinkhorn_assign_stream(given, 0.05, cluster_weights=weights)


@pytest.mark.parametrize("source", ["array", "npy", "features", "streamed features"])
def test_a_cluster_whose_finite_scores_overflow_to_minus_inf_gets_the_span_error(tmp_path, source):
    """A weighted cluster whose every score (or bias) is torch.finfo(torch.float32).min, a mask written as a finite
    fill, is -inf as S / eps at epsilon 0.05, and the streamed check said "infeasible mask: cluster 2 (head 0) ...
    every sample's score for it is -inf", of finite scores (sinkhorn_assign(features=...) too). Now the span error
    sinkhorn_assign gives, naming the cluster and its best score as given, and what to do if that is a mask; a
    column or a bias of -inf keeps its message."""
    from otlabel.problem import ScoreSpanError

    scores = random_problem(30, 4, seed=7).numpy()

    def solve(value):
        column = scores.copy()
        column[:, 2] = value
        bias = np.array([0.0, 0.0, value, 0.0], dtype=np.float32)
        features = dict(features=scores, prototypes=np.eye(4, dtype=np.float32), bias=bias, epsilon=0.05)
        if source == "npy":
            np.save(tmp_path / "s.npy", column)
        if source in ("array", "npy"):
            return sinkhorn_assign_stream(column if source == "array" else tmp_path / "s.npy", 0.05)
        return (sinkhorn_assign if source == "features" else sinkhorn_assign_stream)(**features)

    said = (
        r"reach 6\.8\de\+39 \(cluster 2, head 0: its best score -3\.4e\+38, epsilon 0\.05\).* If cluster 2's "
        r"scores( \(its prototype's products, and its bias if given\))? stand for a mask .* give it weight 0 in "
        "cluster_weights"
    )
    with pytest.raises(ScoreSpanError, match=said):
        solve(float(np.finfo(np.float32).min))
    with pytest.raises(ValueError, match="infeasible.* (cluster 2 .*|bias )-inf"):
        solve(-np.inf)


def test_a_cluster_far_below_the_rest_is_named_with_what_to_do_for_a_mask_fill():
    """A weighted cluster whose scores are all -1e9 (scores.masked_fill(mask, -1e9) closing it) is a span error whose
    fix, shifting the cluster's scores by their maximum, fills the cluster as the balanced plan must: right for
    scores, wrong for a mask. sinkhorn_assign said "|scores| up to 1e+09" without naming the cluster, and no path
    said what to do for a mask. Every path now names the cluster and says it (give it weight 0, or use -inf)."""
    from otlabel import sinkhorn_assign_sharded
    from otlabel.problem import ScoreSpanError

    scores = random_problem(30, 4, seed=7)
    scores[:, 2] = -1e9
    said = r"\(cluster 2, head 0: its best score -1e\+09, epsilon 0\.05\).* If cluster 2's scores stand for a mask"
    for solve in (sinkhorn_assign, sinkhorn_assign_stream, sinkhorn_assign_sharded):
        with pytest.raises(ScoreSpanError, match=said):
            solve(scores.numpy() if solve is sinkhorn_assign_stream else scores, 0.05)
    closed = sinkhorn_assign(scores, 0.05, cluster_weights=torch.tensor([0.4, 0.3, 0.0, 0.3]))  # the advice, followed
    assert closed.converged and not bool((closed.labels == 2).any())


def test_scores_far_below_zero_alike_get_no_mask_fill_advice():
    """Negative squared distances, or logits all offset by -1000, put every cluster's best score far below 0, none
    far below the rest: the span error named cluster 0 as if it alone were low, and said what to do if its scores
    stand for a mask (give it weight 0) in memory. They are scores, and a shift by each sample's maximum is the fix:
    no mask advice on any path. A cluster far below the others keeps it."""
    from otlabel import sinkhorn_assign_sharded
    from otlabel.problem import ScoreSpanError

    scores = random_problem(30, 4, seed=7) - 1000
    for solve in (sinkhorn_assign, sinkhorn_assign_stream, sinkhorn_assign_sharded):
        with pytest.raises(ScoreSpanError) as err:
            solve(scores.numpy() if solve is sinkhorn_assign_stream else scores, 0.05)
        assert "stand for a mask" not in str(err.value) and "Subtract each sample's maximum" in str(err.value)
    scores[:, 2] -= 1000  # now far below the rest
    with pytest.raises(ScoreSpanError, match=r"\(cluster 2, head 0: .* If cluster 2's scores stand for a mask"):
        sinkhorn_assign(scores, 0.05)


def test_an_overflow_below_zero_on_a_cluster_of_weight_0_alone_leaves_the_sample_stranded():
    """A sample masked (-inf) on every weighted cluster whose score for a cluster of weight 0 is -3e38 (-inf as
    S / eps at epsilon 0.05) was given the span error for that score, which takes no part in the solve: following its
    advice still leaves the sample with nowhere to go. It now gets what sinkhorn_assign says, "allowed only in
    clusters of weight 0"; and where a weighted cluster's score overflows too, the span error names that one, not an
    earlier cluster of weight 0."""
    from otlabel.problem import ScoreSpanError

    scores = random_problem(30, 4, seed=7).numpy()
    weights = np.array([0.0, 0.3, 0.3, 0.4])
    scores[9] = [-3e38, -np.inf, -np.inf, -np.inf]
    for solve in (sinkhorn_assign, sinkhorn_assign_stream):
        with pytest.raises(ValueError, match="sample 9 .* is allowed only in clusters of weight 0"):
            solve(torch.from_numpy(scores) if solve is sinkhorn_assign else scores, 0.05, cluster_weights=weights)
    scores[9, 2] = -3e38
    with pytest.raises(ScoreSpanError, match=r"a score of -3e\+38 at index \(9, 2\)"):
        sinkhorn_assign_stream(scores, 0.05, cluster_weights=weights)
