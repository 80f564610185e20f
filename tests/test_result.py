"""SinkhornResult.to / .cpu: a new result on another device, whose lazy read-outs give the original's values.

No GPU is needed: moving to the CPU itself checks the values, moving to the "meta" device (shapes, no data) checks
that every tensor moves and that the lazy read-outs are computed where the scores are, from the solve's potentials.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import cosine_scores

from otlabel import sinkhorn_assign, sinkhorn_assign_stream

META = torch.device("meta")


@pytest.mark.parametrize("heads", [None, 3])
def test_a_result_moved_to_the_cpu_reads_out_what_the_original_does(heads):
    """The moved result is new; its codes, plan and objective, first read after the move, are bitwise the original's
    (computed from the same potentials over the same scores)."""
    scores = (
        cosine_scores(300, 12, seed=1)
        if heads is None
        else torch.stack([cosine_scores(300, 12, seed=s) for s in range(heads)])
    )
    res = sinkhorn_assign(scores, 0.05)
    moved, host = res.to("cpu"), res.cpu()
    assert moved is not res and host is not res and moved.errors is not res.errors
    for other in (moved, host):
        assert torch.equal(other.labels, res.labels)
        assert torch.equal(other.cluster_potentials, res.cluster_potentials)
        assert (other.n_iter, other.converged, other.marginal_error, other.errors, other.epsilon) == (
            res.n_iter,
            res.converged,
            res.marginal_error,
            res.errors,
            res.epsilon,
        )
    codes, objective = moved.codes, moved.objective  # read first on the moved result
    assert torch.equal(codes, res.codes)
    assert torch.equal(moved.plan, res.plan)
    if heads is None:
        assert objective == res.objective
    else:
        assert torch.equal(objective, res.objective)
    assert torch.equal(host.codes, res.codes)


@pytest.mark.parametrize("read_first", [False, True], ids=["lazy", "read before the move"])
def test_every_tensor_of_a_moved_result_is_on_the_device(read_first):
    """Labels, potentials, codes (read before or after the move), the plan and a batched objective are all on the
    target device; the read-outs after the move are computed on the scores' device from the solve's potentials (the
    moved ones, on "meta", hold no values to compute from) and then moved."""
    scores = torch.stack([cosine_scores(200, 8, seed=s) for s in range(2)])
    res = sinkhorn_assign(scores, 0.05)
    if read_first:
        res.codes, res.objective  # noqa: B018 (kept by the result)
    moved = res.to(META)
    assert moved.labels.device == META and moved.labels.shape == (2, 200) and moved.labels.dtype == torch.int64
    assert moved.cluster_potentials.device == META and moved.cluster_potentials.dtype == res.cluster_potentials.dtype
    for tensor, shape in ((moved.codes, (2, 200, 8)), (moved.plan, (2, 200, 8)), (moved.objective, (2,))):
        assert tensor.device == META and tensor.shape == shape
    assert res.labels.device.type == "cpu" and res.codes.device.type == "cpu"  # the original stays
    assert "on meta" in repr(moved)


def test_a_moved_streamed_result_reads_out_what_the_original_does():
    scores = cosine_scores(500, 10, seed=3).numpy()
    res = sinkhorn_assign_stream(scores, 0.05)
    moved = res.cpu()
    assert torch.equal(moved.codes, res.codes) and moved.objective == res.objective
    assert res.to(META).codes.shape == (500, 10)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.float16,), {}, "does not convert dtypes.*res.codes.to"),
        (("cpu",), {"dtype": torch.float64}, "does not convert dtypes"),
        ((torch.zeros(1),), {}, r"not a tensor.*res.to\(x.device\)"),
        ((), {}, "needs a device"),
        ((1.5,), {}, "not float"),
        ((True,), {}, "not bool"),
    ],
    ids=["dtype", "dtype keyword", "tensor", "nothing", "float", "bool"],
)
def test_to_refuses_what_is_not_a_device(args, kwargs, match):
    res = sinkhorn_assign(cosine_scores(50, 4), 0.05)
    with pytest.raises(TypeError, match=match):
        res.to(*args, **kwargs)


def test_a_device_string_torch_does_not_know_is_torchs_error():
    res = sinkhorn_assign(cosine_scores(50, 4), 0.05)
    with pytest.raises(RuntimeError, match="device"):
        res.to("gpu")


def test_an_index_where_torch_sees_no_accelerator_says_to_pass_a_device_string():
    """Found reviewing ``.to``: it takes an int as a device index, which torch (2.13) reads as its accelerator's; on
    a machine with none, ``res.to(0)`` raised torch's ``RuntimeError: Cannot access accelerator device when none is
    available.``, which names neither the index nor what to pass."""
    try:
        torch.device(0)
    except RuntimeError:
        pass
    else:
        pytest.skip("torch takes device index 0 here (an accelerator, or a torch that reads it as CUDA's)")
    res = sinkhorn_assign(cosine_scores(50, 4), 0.05)
    with pytest.raises(ValueError, match=r"to\(0\): an integer is a device index.*res\.cpu\(\), res\.to\('cuda:0'\)"):
        res.to(0)


def test_a_result_pickled_before_to_existed_reads_out_after_loading():
    """Found reviewing ``.to``: it added two attributes that every read-out consults, set by ``__init__`` only. A result
    pickled by an earlier otlabel (``torch.save(res, f)``, ``weights_only=False``) loads without them, and its
    ``codes``, ``plan`` and ``objective`` raised ``AttributeError: ... '_solve_potentials'``. They have class-level
    defaults now. The earlier result is this one without the two attributes (unpickling sets the saved ``__dict__``)."""
    res = sinkhorn_assign(cosine_scores(80, 6, seed=2), 0.05)
    saved = pickle.dumps(res)
    del res.__dict__["_device"], res.__dict__["_solve_potentials"]  # as an earlier otlabel's result holds its state
    earlier = pickle.loads(pickle.dumps(res))
    assert "_solve_potentials" not in earlier.__dict__
    now = pickle.loads(saved)
    assert torch.equal(earlier.codes, now.codes) and earlier.objective == now.objective
    assert torch.equal(earlier.plan, now.plan) and torch.equal(earlier.cpu().codes, now.codes)
