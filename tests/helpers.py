"""Problem generators and comparison helpers shared by the tests."""

from __future__ import annotations

import numpy as np
import torch

# (atol on codes, rtol on potentials differences) per input dtype, against the float64 reference.
TOLERANCES = {
    torch.float64: dict(codes=1e-9, potentials=1e-8),
    torch.float32: dict(codes=1e-5, potentials=1e-5),
    torch.float16: dict(codes=1e-5, potentials=1e-5),  # inputs rounded first: compared on the same rounded scores
    torch.bfloat16: dict(codes=1e-5, potentials=1e-5),
}


def random_problem(n, k, h=None, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (n, k) if h is None else (h, n, k)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def cosine_scores(n, k, d=16, seed=0):
    """SwAV/DINO-like scores: cosine similarities of L2-normalised features and prototypes, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.T


def clustered_cosine_scores(n, k, d=16, noise=0.3, seed=0):
    """Cosine scores of features drawn around the prototypes, as in a trained SwAV: maxima close to 1."""
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    z = c[torch.arange(n) % k] + noise * torch.randn(n, d, generator=g) / d**0.5
    return torch.nn.functional.normalize(z, dim=1) @ c.T


def random_weights(size, seed=0, zeros=0):
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.2, 1.0, size)
    w[:zeros] = 0.0
    return torch.from_numpy(w / w.sum())


def centred(b: torch.Tensor) -> torch.Tensor:
    """Potentials are defined up to an additive constant per head: compare them centred."""
    b = b.double()
    finite = torch.isfinite(b)
    mean = torch.where(finite, b, 0.0).sum(-1, keepdim=True) / finite.sum(-1, keepdim=True)
    return torch.where(finite, b - mean, 0.0)


def assert_close(actual, expected, atol, rtol=0.0, what="values"):
    actual, expected = torch.as_tensor(actual).double().cpu(), torch.as_tensor(expected).double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same_inf = torch.isinf(actual) & (actual == expected)  # -inf == -inf is agreement, not a NaN difference
    diff = torch.where(same_inf, 0.0, actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = ~(diff <= bound)
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what} differ at {int(bad.sum())} of {bad.numel()} places; first at {idx}: "
            f"{float(actual[idx])!r} vs {float(expected[idx])!r} "
            f"(max diff {float(diff.max()):.3g}, atol {atol}, rtol {rtol})"
        )


def offset_scores(kind: str, span: float, eps: float, n: int = 1000, k: int = 40) -> torch.Tensor:
    """Uniform scores plus a common, per-sample or per-cluster offset that brings |S| / eps to ``span``:
    offsets change nothing in the plan, only the arithmetic."""
    g = torch.Generator().manual_seed(3)
    base = torch.rand(n, k, generator=g) * 2 - 1
    offset = span * eps - 1
    shifts = {"common": torch.ones(1, 1), "per sample": torch.rand(n, 1, generator=g) * 0.5 + 0.5,
              "per cluster": torch.rand(1, k, generator=g) * 0.5 + 0.5}  # fmt: skip
    return base + offset * shifts[kind]


def fast_argmax_takes_the_last(monkeypatch) -> None:
    """Make the Triton interpreter's ``tl.argmax(..., tie_break_left=False)`` return the last maximiser on ties.

    On a GPU that tie-break returns an arbitrary maximiser; the interpreter always returns the first (NumPy's
    ``nanargmax``), so a kernel that relied on the fast tie-break could not fail on CPU. Needs TRITON_INTERPRET=1."""
    import triton.language as tl
    from triton.runtime import interpreter

    apply_impl = interpreter.ReduceOps.apply_impl

    def apply(self, input):
        if self.combine_fn is not tl.standard._argmax_combine_tie_break_fast:
            return apply_impl(self, input)
        values = input[0][0] if isinstance(input[0], tuple) else input[0]
        data = np.flip(values.handle.data, axis=self.axis)
        last = data.shape[self.axis] - 1 - np.nanargmax(data, axis=self.axis, keepdims=self.keep_dims)
        best = np.nanmax(data, axis=self.axis, keepdims=self.keep_dims)
        return self.to_tensor(best, values.dtype), self.to_tensor(last, tl.int32)

    monkeypatch.setattr(interpreter.ReduceOps, "apply_impl", apply)
