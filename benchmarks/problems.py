"""The inputs every scenario uses: SwAV-like cosine scores, built once per size and shared by all methods.

Scores are cosine similarities between L2-normalised features ``z`` (N, D) and prototypes ``c`` (K, D),
``S = z c^T`` in [-1, 1] — what SwAV/DINO/SeLa-style heads produce. Each sample is drawn near one
prototype (a noisy cluster structure), so the problem is neither trivial (uniform scores) nor degenerate.
The warm-start scenario needs a *previous* problem: the same features against prototypes that drifted a
little, as they do between two labelling steps of a training run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

FEATURE_DIM = 64
NOISE = 0.8  # feature noise relative to the prototype: S of the own cluster ~ 0.7, others ~ 0
DRIFT = 0.05  # prototype drift between two labelling steps (warm start)


@dataclass
class Problem:
    """One balanced-assignment problem in each method's native input format (prepared outside timings)."""

    scores: torch.Tensor  # (N, K) float32 on the benchmark device
    epsilon: float
    previous: torch.Tensor | None = None  # (N, K) scores before the prototypes drifted, for warm starts
    features: tuple[torch.Tensor, torch.Tensor] | None = None  # (N, D) features, (K, D) prototypes: S = z c^T
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return self.scores.shape[0]

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    @property
    def device(self) -> torch.device:
        return self.scores.device

    def with_epsilon(self, epsilon: float) -> Problem:
        """The same scores at another temperature (shares the converted inputs)."""
        return Problem(self.scores, epsilon, self.previous, self.features, self._cache)

    def scores64(self) -> np.ndarray:
        """(N, K) float64 NumPy scores: the input of the NumPy/float64 methods (POT, SeLa)."""
        if "s64" not in self._cache:
            self._cache["s64"] = self.scores.double().cpu().numpy()
        return self._cache["s64"]

    def cost64(self) -> np.ndarray:
        """(N, K) float64 cost ``M = -S`` for POT (POT minimises ``<P, M> - eps H(P)``)."""
        if "m64" not in self._cache:
            self._cache["m64"] = -self.scores64()
        return self._cache["m64"]

    def cost_torch(self) -> torch.Tensor:
        """(N, K) float32 cost ``-S`` on the device, for POT's torch backend (the user's native dtype)."""
        if "mt" not in self._cache:
            self._cache["mt"] = -self.scores
        return self._cache["mt"]

    def drop_caches(self) -> None:
        self._cache.clear()


def make_features(n: int, k: int, *, seed: int = 0, drift: float = 0.0, device="cpu"):
    """Unit features (N, D) and prototypes (K, D); ``drift > 0`` perturbs the prototypes (same seed otherwise)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.nn.functional.normalize(torch.randn(k, FEATURE_DIM, generator=g), dim=1)  # (K, D)
    owner = torch.randint(0, k, (n,), generator=g)
    noise = torch.randn(n, FEATURE_DIM, generator=g) * (NOISE / FEATURE_DIM**0.5)
    feats = torch.nn.functional.normalize(protos[owner] + noise, dim=1)  # (N, D)
    if drift:
        protos = torch.nn.functional.normalize(protos + drift * torch.randn(k, FEATURE_DIM, generator=g), dim=1)
    return feats.to(device), protos.to(device)


def make_scores(n: int, k: int, *, seed: int = 0, drift: float = 0.0, device="cpu") -> torch.Tensor:
    """(N, K) float32 cosine scores ``z c^T`` of :func:`make_features`."""
    feats, protos = make_features(n, k, seed=seed, drift=drift, device=device)
    return (feats @ protos.T).contiguous()  # (N, K)


def make_problem(n: int, k: int, epsilon: float, *, seed: int = 0, device="cpu", warm: bool = False) -> Problem:
    """The problem at size (N, K); with ``warm`` also the scores one labelling step earlier."""
    feats, protos = make_features(n, k, seed=seed, device=device)
    previous = make_scores(n, k, seed=seed, drift=DRIFT, device=device) if warm else None
    return Problem((feats @ protos.T).contiguous(), epsilon, previous, (feats, protos))


def sizes_within(ns, ks, max_elements: int) -> list[tuple[int, int]]:
    """All (N, K) of the grid whose score matrix has at most ``max_elements`` entries."""
    return [(n, k) for n in ns for k in ks if n * k <= max_elements]
