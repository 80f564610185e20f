"""Whether a mask admits a balanced plan at all, and if not, which clusters and samples are to blame.

A plan ``P >= 0`` with row sums ``c`` (the sample weights), column sums ``r`` (the cluster weights) and
``P[j, k] = 0`` wherever ``S[j, k] = -inf`` exists exactly when the bipartite network source -> sample ``j``
(capacity ``c_j``) -> cluster ``k`` (unbounded, only on allowed pairs) -> sink (capacity ``r_k``) carries a flow of
1. By Hall's theorem that fails exactly when some set of samples may only go to clusters whose weights add up to
less than the samples' own mass; equally, when some set of clusters needs more mass than the samples that may go to
any of them carry. Sinkhorn then never converges: it only chases the difference. :mod:`otlabel.problem` catches the
one-row and one-column cases (a sample masked everywhere, a weighted cluster that no sample may reach); this module
decides the general case, and names the clusters at fault.

Compression by patterns. Samples with the same allowed set are interchangeable in the network, so only the distinct
rows of the mask matter, each with its total weight (and its number of samples, for the message).
:class:`MaskPatterns` collects them chunk by chunk (a streamed pass as well as a whole matrix). Rows where every
cluster is allowed, by far the most common, form one implicit group: it may go to every cluster, so it never takes
part in a violation and only counts in the totals.

No graph for most masks. A violation is a set A of samples and a set C of clusters, every pair between them
forbidden, with ``c(A) + r(C) > 1`` (the samples of A may only go to the other clusters, of weight ``1 - r(C)``).
Each sample group g of A forbids at least C and each cluster k of C is forbidden to at least A, so
``shut[g] + barred[k] > 1``, where ``shut[g]`` is the weight of the clusters g may not go to and ``barred[k]`` the
mass of the samples that may not go to k. When no forbidden pair is so "hot" (a random 2% of -inf scores, a few
clusters closed to a few samples), the mask is feasible and the check ends there, at the cost of two weighted sums
over the patterns. Otherwise the maximum flow runs on the groups and clusters that have a hot pair, with every other
cluster merged into one that all of those groups may reach: that network holds every violation and no other. On
in-memory scores, when the hot samples are too many to group (:data:`PRUNE_ABOVE_EDGES`), the test is first
repeated on the device within the hot samples and clusters, the sums taken over those alone, until they stop
shrinking (:func:`prune_hot_rows`): a violation's pairs stay hot, and on random masks (50% -inf) no sample or a few
hundred are left of the ~60% that the first round keeps.

Rounding. :func:`scipy.sparse.csgraph.maximum_flow` needs int32 capacities (wider ones are silently truncated), so
the masses, each side taken relative to its own total, are scaled by ``M = 2**30``: sample groups get
``floor(c * M)``, clusters ``ceil(r * M)``, the unbounded edges one more than the samples' total: every capacity,
and the flow, stays below 2**31. Rounding the samples down and the clusters up only helps a plan, so a feasible mask
(exactly feasible ones included) always saturates the samples: a shortfall is a real violation. It is reported once
it exceeds ``1e-9`` of the mass (float64 sums of many weights are not exact either), or, for weights given in a
narrower dtype, what rounding them to it may have moved (one float32 unit, 1.2e-7, for float32 weights: a float32
4/7 is 2.5e-8 above 4/7, so exactly tight masks looked infeasible). The price: a violation smaller than that, plus
``(number of groups + K) / M``, may go unreported (the solve then stalls at an error of about twice it).

Size limit. The network has up to one edge per (pattern, cluster) pair. Once the distinct patterns times K exceed
:data:`MAX_PATTERN_EDGES`, :class:`MaskPatterns` drops what it collected, marks itself ``too_large`` and ignores
further rows, and :func:`check_feasible` skips the check: an infeasible mask then shows as a solve that does not
converge, as it would without this module.
"""

from __future__ import annotations

import math

import numpy as np

MAX_PATTERN_EDGES = 20_000_000  # distinct patterns x K beyond which the patterns are dropped and the check skipped
FLOW_SCALE = 2**30  # masses are scaled to integers by this: every capacity, and the flow, stays below 2**31
MASS_TOLERANCE = 1e-9  # a shortfall of the flow up to this share of the mass is not reported (see shortfall_tolerance)
MAX_NAMED = 8  # clusters named in a message before "..."
BLOCK_ELEMENTS = 2**20  # the (group, cluster) entries handled at once by the weighted sums: bounds their memory


def shortfall_tolerance(mass_rounding: float = 0.0) -> float:
    """The share of the mass by which a mask may leave the weights unmet and still count as feasible: what rounding
    the weights to their dtype may have moved (``mass_rounding``, :func:`otlabel.problem.weight_rounding`), or
    :data:`MASS_TOLERANCE`, whichever is larger. The one rule for :func:`check_feasible` and for the exact solvers,
    which drop that much mass from forbidden pairs (:func:`otlabel.exact._result`): they refused a plan short by 1e-11
    (the generic 'no feasible plan', after the solve) that this check had let through."""
    return max(MASS_TOLERANCE, mass_rounding)


class MaskPatterns:
    """The distinct allowed-patterns of a mask's rows, with their total weights and sample counts, over K clusters.

    :meth:`add` takes rows (a chunk at a time, in any order) as a boolean ``allowed`` matrix, ``True`` where the
    score is not -inf; rows of weight 0 are dropped (they carry no mass), rows with every cluster allowed join one
    implicit group. :meth:`add_unmasked` adds such rows by their total alone, when the caller has already set them
    apart (typically, only the rows with some -inf score go to :meth:`add`).

    The groups are kept as arrays sorted by pattern: a pattern's key is its row packed to bits, as one uint64 for
    K <= 64 and as a raw-bytes (void) scalar otherwise, so that NumPy sorts, dedups and looks them up without a
    Python step per row or per pattern (a dict insert per pattern, plus ``np.unique(axis=0)``, took ~2 us a row on
    masks whose rows are all distinct, e.g. 50% random -inf, and ~3 s for 1M rows of two patterns: that unique sorts
    a structured dtype of one field per byte). :meth:`patterns` and :meth:`packed` give the groups in that order.

    Bounded: once the distinct patterns times K exceed ``max_edges`` (:data:`MAX_PATTERN_EDGES`), the patterns are
    dropped, ``too_large`` is set and later rows are ignored; :func:`check_feasible` then skips the check.
    """

    def __init__(self, num_clusters: int, max_edges: int | None = None):
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be at least 1, got {num_clusters}.")
        self.num_clusters = int(num_clusters)
        self.max_edges = int(MAX_PATTERN_EDGES if max_edges is None else max_edges)  # read now: patchable in tests
        self._width = (self.num_clusters + 7) // 8  # bytes per packed row
        self._too_large = False
        self.unmasked_weight = 0.0  # rows with every cluster allowed: their total weight, and how many
        self.unmasked_count = 0
        self._give_up(too_large=False)  # the groups: sorted distinct keys (G,), their weights and counts
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # rows given to add() and not yet grouped
        self._pending_rows = 0

    @property
    def too_large(self) -> bool:
        """Whether the patterns were dropped (more than ``max_edges`` / K of them): the check is then skipped."""
        self._flush()
        return self._too_large

    def __len__(self) -> int:
        """The number of distinct masked patterns (the all-allowed group not counted)."""
        self._flush()
        return len(self._keys)

    @property
    def total_weight(self) -> float:
        """The weight of every row added so far, masked or not."""
        self._flush()
        return self.unmasked_weight + math.fsum(self._weights.tolist())

    def add_unmasked(self, weight: float, count: int) -> None:
        """Rows with every cluster allowed, by their total ``weight`` and how many of them have positive weight."""
        if not (weight >= 0 and math.isfinite(weight)) or count < 0:
            raise ValueError(f"add_unmasked needs a finite weight >= 0 and a count >= 0, got {weight} and {count}.")
        self.unmasked_weight += float(weight)
        self.unmasked_count += int(count)

    def add(self, allowed: np.ndarray, weights: np.ndarray) -> None:
        """Rows ``allowed`` (T, K) bool (``True``: the sample may go to that cluster) with their ``weights`` (T,).

        Small blocks (the masked rows of one chunk of a streamed pass: at most the chunk's 1,048 rows at K = 1,000 on
        a CPU, often far fewer) are held until ~BLOCK_ELEMENTS entries have come, then grouped together: the
        grouping's fixed cost per call made the streamed check ~10x slower."""
        allowed = np.asarray(allowed, dtype=bool)
        weights = np.asarray(weights, dtype=np.float64)
        if allowed.ndim != 2 or allowed.shape[1] != self.num_clusters or weights.shape != allowed.shape[:1]:
            raise ValueError(
                f"add needs allowed of shape (T, {self.num_clusters}) and weights of shape (T,), got "
                f"{allowed.shape} and {weights.shape}."
            )
        if self._too_large:
            return
        positive = weights > 0
        full = allowed.all(axis=1)
        unmasked = positive & full
        if unmasked.any():
            self.add_unmasked(float(weights[unmasked].sum()), int(unmasked.sum()))
        rest = np.flatnonzero(positive & ~full)
        if rest.size:
            self._pending.append((allowed[rest], weights[rest]))
            self._pending_rows += rest.size
        if self._pending_rows * self.num_clusters >= BLOCK_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        """Group the masked rows held by :meth:`add`."""
        if not self._pending:
            return
        allowed = np.concatenate([a for a, _ in self._pending])
        weights = np.concatenate([w for _, w in self._pending])
        self._pending, self._pending_rows = [], 0
        if self._too_large:
            return
        keys, inverse = np.unique(self._keys_of(np.packbits(allowed, axis=1)), return_inverse=True)
        inverse = inverse.reshape(-1)
        self._add_groups(keys, np.bincount(inverse, weights=weights, minlength=len(keys)),
                         np.bincount(inverse, minlength=len(keys)))  # fmt: skip

    def merge(self, other: MaskPatterns) -> None:
        """Add the rows another collection (over the same clusters) has gathered, e.g. on another shard."""
        if other.num_clusters != self.num_clusters:
            raise ValueError(f"cannot merge patterns over {other.num_clusters} clusters into {self.num_clusters}.")
        other._flush()
        self._flush()
        if other._too_large:
            self._give_up()
        if self._too_large:
            return
        self.add_unmasked(other.unmasked_weight, other.unmasked_count)
        self._add_groups(other._keys, other._weights, other._counts)

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The masked groups as sent between ranks: packed patterns (G, ceil(K / 8)) uint8, weights, counts."""
        self._flush()
        return self._rows_of(self._keys), self._weights.copy(), self._counts.astype(np.float64)

    def add_packed(self, packed: np.ndarray, weights: np.ndarray, counts: np.ndarray) -> None:
        """Add groups in the form :meth:`packed` gives them (another rank's)."""
        packed = np.ascontiguousarray(packed, dtype=np.uint8)
        weights, counts = np.asarray(weights, dtype=np.float64), np.asarray(counts, dtype=np.float64)
        if packed.ndim != 2 or packed.shape[1] != self._width or not weights.shape == counts.shape == packed.shape[:1]:
            raise ValueError(
                f"add_packed needs packed of shape (G, {self._width}), weights and counts of shape (G,), got "
                f"{packed.shape}, {weights.shape} and {counts.shape}."
            )
        self._flush()
        if self._too_large:
            return
        keys, inverse = np.unique(self._keys_of(packed), return_inverse=True)  # a pattern given twice is one group
        inverse = inverse.reshape(-1)
        summed_counts = np.rint(np.bincount(inverse, weights=counts, minlength=len(keys))).astype(np.int64)
        self._add_groups(keys, np.bincount(inverse, weights=weights, minlength=len(keys)), summed_counts)

    def patterns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The masked groups as arrays: allowed (G, K) bool, weights (G,) float64, counts (G,) int64."""
        self._flush()
        allowed = np.unpackbits(self._rows_of(self._keys), axis=1, count=self.num_clusters).view(bool)  # 0 or 1
        return allowed, self._weights.copy(), self._counts.copy()

    def _keys_of(self, packed: np.ndarray) -> np.ndarray:
        """One sortable key per packed row (T, width) uint8: the row's bytes as a uint64 when they fit in 8, else as
        a void scalar (compared as bytes)."""
        packed = np.ascontiguousarray(packed, dtype=np.uint8)
        if self._width > 8:
            return packed.view(f"V{self._width}").reshape(-1)
        wide = np.zeros((len(packed), 8), dtype=np.uint8)
        wide[:, : self._width] = packed
        return wide.view("<u8").reshape(-1).astype(np.uint64)

    def _rows_of(self, keys: np.ndarray) -> np.ndarray:
        """The packed rows (G, width) uint8 of ``keys``: the inverse of :meth:`_keys_of`."""
        if self._width > 8:
            return np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), self._width)
        return np.ascontiguousarray(keys.astype("<u8").view(np.uint8).reshape(len(keys), 8)[:, : self._width])

    def _add_groups(self, keys: np.ndarray, weights: np.ndarray, counts: np.ndarray) -> None:
        """Add groups of distinct sorted ``keys`` with their weights and counts: to a known pattern's group, or as new
        groups; gives up when the distinct patterns times K exceed ``max_edges``."""
        at = np.searchsorted(self._keys, keys)  # (U,) where each key is, or goes
        known = at < len(self._keys)
        known[known] = self._keys[at[known]] == keys[known]
        self._weights[at[known]] += weights[known]  # distinct keys: no index repeats
        self._counts[at[known]] += counts[known]
        fresh = ~known
        if (len(self._keys) + int(fresh.sum())) * self.num_clusters > self.max_edges:
            self._give_up()
            return
        if fresh.any():
            at = at[fresh]  # np.insert puts each before the key at its position: the keys stay sorted
            self._keys = np.insert(self._keys, at, keys[fresh])
            self._weights = np.insert(self._weights, at, weights[fresh])
            self._counts = np.insert(self._counts, at, counts[fresh])

    def _give_up(self, too_large: bool = True) -> None:
        """Drop the groups (and, unless told otherwise, mark the collection too large)."""
        self._too_large = too_large
        self._keys = self._keys_of(np.zeros((0, self._width), dtype=np.uint8))
        self._weights = np.zeros(0, dtype=np.float64)
        self._counts = np.zeros(0, dtype=np.int64)


def collect_masks(patterns: list[MaskPatterns], scores, masked, sample_weights: np.ndarray) -> None:
    """Add a block of samples to the per-head ``patterns``: ``scores`` (H, T, K) a torch tensor on any device,
    ``masked`` the (H, T) flags of the rows with a -inf score for a cluster of positive weight (a -inf for a
    zero-weight cluster constrains nothing; None: no such row), as :func:`otlabel.problem.check_rows` returns
    them, and float64 ``sample_weights`` (T,). Only the flagged rows leave the device, in slices of
    ~BLOCK_ELEMENTS."""
    picked = np.zeros(scores.shape[:2], dtype=bool) if masked is None else masked.cpu().numpy()
    for h, head_patterns in enumerate(patterns):
        _add_rows(head_patterns, scores[h], picked[h], sample_weights)


def _add_rows(patterns: MaskPatterns, scores, picked: np.ndarray, weights: np.ndarray) -> None:
    """Add one head's samples (scores (T, K) on any device, float64 ``weights`` (T,)) to ``patterns``: those
    ``picked`` (bool (T,)) with their mask rows, moved off the device in slices of ~BLOCK_ELEMENTS, the others by
    their total as allowed everywhere."""
    import torch

    if patterns._too_large:  # not the property: it would group the rows held so far, chunk by chunk
        return
    patterns.add_unmasked(float(weights[~picked].sum()), int((~picked & (weights > 0)).sum()))
    rows, step = np.flatnonzero(picked), max(1, BLOCK_ELEMENTS // scores.shape[-1])
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        patterns.add(~torch.isneginf(scores[torch.from_numpy(part).to(scores.device)]).cpu().numpy(), weights[part])
        if patterns._too_large:
            return


DEVICE_BLOCK_ELEMENTS = 2**24  # scores per block of the on-device sums (a copy of the block's mask as floats)


def check_dense_mask(scores, sample_weights, cluster_weights, batched: bool, mass_rounding: float = 0.0) -> None:
    """Hall's condition for in-memory scores (H, N, K) on any device, without moving the mask unless it must.

    The hot-pair test of the module docstring runs on the device over the whole mask (:func:`hot_sums`); most masks
    end there. Otherwise only the samples with a hot pair are collected into :class:`MaskPatterns` (the others count
    as allowed everywhere: every violation is made of hot pairs, and allowing more pairs elsewhere creates none) and
    :func:`check_feasible` decides, on the float64 weights (``mass_rounding``: as there).
    """
    for h in range(scores.shape[0]):
        shut, barred, margin = hot_sums(scores[h], sample_weights, cluster_weights)
        if float(shut.max() + barred.max()) <= 1 - margin:
            continue  # no hot pair: feasible
        patterns = hot_patterns(scores[h], sample_weights, cluster_weights, shut, barred, margin, prune=True)
        check_feasible(patterns, cluster_weights.double().cpu().numpy(), head=h if batched else None,
                       mass_rounding=mass_rounding)  # fmt: skip


def hot_sums(scores, sample_weights, cluster_weights):
    """``shut`` (N,) and ``barred`` (K,) of the module docstring for one head's scores (N, K), and the margin within
    which a pair counts as hot (a forbidden ``(j, k)`` with ``shut[j] + barred[k] > 1 - margin``).

    Two float32 matrix-vector products per block of samples on the scores' device (float64 ones took 2-4x as long
    on a CPU), each block's ``barred`` added into a float64 total (float32 over 4M samples at once was off by 2e-4
    and let an infeasible mask through). The margin bounds the float32 error: a block of B samples is off by at
    most B·2^-24 of its mass, a sample's ``shut`` by K·2^-24. Where the device has no float64 (MPS) the total stays
    float32 and the margin grows with N. A wider margin only makes more pairs hot (more work for the exact flow),
    never fewer."""
    import torch

    from .problem import autocast_off

    n, k = scores.shape
    blocks = _device_blocks(n, k)
    exact_total = scores.device.type != "mps"
    rows_per_sum = (blocks[0].stop - blocks[0].start if exact_total else n) if blocks else 0
    margin = min(0.5, (rows_per_sum + k + 2) * 2.0**-24)
    c = sample_weights.to(scores.device, torch.float32)
    r = cluster_weights.to(scores.device, torch.float32)
    relevant = r > 0  # a -inf for a zero-weight cluster constrains nothing
    shut = torch.zeros(n, dtype=torch.float32, device=scores.device)
    barred = torch.zeros(k, dtype=torch.float64 if exact_total else torch.float32, device=scores.device)
    with autocast_off():  # the margin is for float32 products: under a caller's autocast they were bfloat16
        for rows in blocks:
            forbidden = (torch.isneginf(scores[rows]) & relevant).to(torch.float32)
            shut[rows] = forbidden @ r
            barred += (c[rows] @ forbidden).to(barred.dtype)
    return shut.to(barred.dtype), barred, margin


def hot_patterns(scores, sample_weights, cluster_weights, shut, barred, margin: float,
                 prune: bool = False) -> MaskPatterns:  # fmt: skip
    """The :class:`MaskPatterns` of the samples of one head's scores (N, K) that have a hot pair (given ``shut``,
    ``barred`` and ``margin`` from :func:`hot_sums`), with their float64 weights; every other sample counts as
    allowed everywhere. Only those samples' mask rows leave the device.

    ``prune``: narrow the hot samples down on the device to a fixed point first (:func:`prune_hot_rows`). Only when
    ``shut`` and ``barred`` cover every sample of the mask: a rank of a sharded solve sees its own samples alone."""
    import torch

    n, k = scores.shape
    if prune:
        picked = np.zeros(n, dtype=bool)
        picked[prune_hot_rows(scores, sample_weights, cluster_weights, shut, barred, margin).cpu().numpy()] = True
    else:
        relevant = cluster_weights.to(scores.device) > 0
        hot = torch.zeros(n, dtype=torch.bool, device=scores.device)
        for block in _device_blocks(n, k):
            hot[block] = (torch.isneginf(scores[block]) & relevant & (barred > 1 - margin - shut[block, None])).any(1)
        picked = hot.cpu().numpy()
    patterns = MaskPatterns(k)
    weights = sample_weights.double().cpu().numpy()  # exact: float32 weights made feasible problems look infeasible
    _add_rows(patterns, scores, picked, weights)
    return patterns


MAX_PRUNE_ROUNDS = 20  # rounds of prune_hot_rows at most: what is left then goes to the exact check as it is
# prune_hot_rows stops once the samples kept times K are at most this: so many rows always fit MaskPatterns, and on
# a 2-core CPU grouping them cost less than more rounds (200k x 100 at 50% random -inf: 0.10 s with one round, 0.15 s
# pruned to none). Above it the rows might exceed MAX_PATTERN_EDGES and the check be skipped: pruning decides it.
PRUNE_ABOVE_EDGES = MAX_PATTERN_EDGES


def prune_hot_rows(scores, sample_weights, cluster_weights, shut, barred, margin: float):
    """The samples (int64 indices, on the device) of one head's scores (N, K) left once the hot-pair test (given
    ``shut``, ``barred`` and ``margin`` from :func:`hot_sums`) is repeated within the hot samples and clusters of the
    round before, until neither shrinks (at most :data:`MAX_PRUNE_ROUNDS` rounds) or the samples kept times K are at
    most :data:`PRUNE_ABOVE_EDGES` (few enough to group), on the scores' device.

    Round 1 is :func:`hot_patterns`' test. Each later round takes ``shut[g]`` as the weight of the clusters kept by
    the round before that g may not go to, ``barred[k]`` as the mass of the samples kept by it that may not go to k,
    and keeps the samples and clusters with a forbidden pair ``shut[g] + barred[k] > 1 - margin``. Sound: every
    sample g and cluster k of a violation (A, C) were kept by the round before (by induction), so still
    ``shut[g] >= r(C)`` and ``barred[k] >= c(A)``, and the pair passes again. The sums are those of :func:`hot_sums`
    over a subset of its terms, in blocks of at most as many samples (float32 products, ``barred`` totalled in the
    dtype of :func:`hot_sums`' ``barred``), so their error stays within the same ``margin``: a block's ``barred`` is
    off by at most B·2^-24 of its mass, a ``shut`` by K·2^-24, rounding the weights to float32 by 2^-24 of their
    total; where the total is float32 (MPS) that margin already holds all N rows. A wider margin only keeps more
    samples, never fewer. One pass over the kept samples per round: a sample's ``shut`` is its own, and the pass
    that tests a round's samples also sums the next round's ``barred`` over those it keeps. Memory: one block of
    ~DEVICE_BLOCK_ELEMENTS scores at a time, as :func:`hot_sums`; the kept samples' mask is held across rounds only
    once it fits in one such block. On random masks a few rounds leave no sample or a few hundred (50% random -inf
    over 100 clusters: 62% of the samples pass round 1, 0.08% round 2, none round 3)."""
    import torch

    from .problem import autocast_off

    n, k = scores.shape
    device, dtype = scores.device, barred.dtype
    c = sample_weights.to(device, torch.float32)
    r = cluster_weights.to(device, torch.float32)
    live = r > 0  # the clusters kept so far (a -inf for a zero-weight cluster constrains nothing)
    step = max(1, DEVICE_BLOCK_ELEMENTS // k)
    rows, held = None, None  # the samples kept so far (None: all), and their forbidden pairs once they fit a block
    count, cluster_count = n, int(live.sum())
    with autocast_off():  # the margin is for float32 products
        for round_ in range(MAX_PRUNE_ROUNDS):
            if round_ and held is None and count <= step:
                held = torch.isneginf(scores[rows]) & (r > 0)
            hot = torch.zeros(count, dtype=torch.bool, device=device)
            hot_shut = torch.full((), -math.inf, dtype=dtype, device=device)  # the largest shut of a hot sample
            next_barred = torch.zeros(k, dtype=dtype, device=device)
            r_live = torch.where(live, r, 0.0)
            for start in range(0, count, step):
                block = slice(start, min(start + step, count))
                if held is not None:
                    forbidden = held[block] & live
                else:
                    forbidden = torch.isneginf(scores[block if rows is None else rows[block]]) & live
                as_float = forbidden.to(torch.float32)
                block_shut = shut[block] if round_ == 0 else (as_float @ r_live).to(dtype)
                pairs = forbidden & (barred > 1 - margin - block_shut[:, None])  # (dropped clusters: none forbidden)
                block_hot = pairs.any(dim=1)
                hot[block] = block_hot
                hot_shut = torch.maximum(hot_shut, torch.where(block_hot, block_shut, -math.inf).max())
                weights = torch.where(block_hot, c[block if rows is None else rows[block]], 0.0)
                next_barred += (weights @ as_float).to(dtype)
            # The clusters that may have a hot pair next round, without a reduction of each block over its samples:
            # a violation's cluster k has barred >= c(A) over the samples kept, and a sample g of A has this round's
            # shut[g] >= r(C) (next round's, over fewer clusters, is no larger), so k is kept (within the margin).
            clusters = live & (next_barred > 1 - margin - hot_shut)
            kept = torch.nonzero(hot).reshape(-1)
            new_count, new_cluster_count = len(kept), int(clusters.sum())
            rows = kept if rows is None else rows[kept]
            if new_count == 0 or new_cluster_count == 0:
                return rows[:0]  # no hot pair left: no violation
            if new_count * k <= PRUNE_ABOVE_EDGES:
                break  # few enough to group (see PRUNE_ABOVE_EDGES)
            if new_count == count and new_cluster_count == cluster_count:
                break  # a fixed point (in round 1: every sample and cluster of positive weight has a hot pair)
            if held is not None:
                held = held[kept]
            shut = None  # from round 2 on, each sample's own (over the clusters kept)
            barred, live = next_barred, clusters
            count, cluster_count = new_count, new_cluster_count
    return rows


def _device_blocks(n: int, k: int) -> list[slice]:
    """Slices of the ``n`` rows, ~DEVICE_BLOCK_ELEMENTS scores each, the last one ending at ``n``: :func:`hot_sums`
    reads its margin off the first one's length."""
    step = max(1, DEVICE_BLOCK_ELEMENTS // k)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def check_masks(patterns: list[MaskPatterns], cluster_weights, batched: bool, mass_rounding: float = 0.0) -> None:
    """:func:`check_feasible` for each head's patterns (``cluster_weights`` (K,) shared by the heads)."""
    r = cluster_weights.double().cpu().numpy()
    for h, head_patterns in enumerate(patterns):
        check_feasible(head_patterns, r, head=h if batched else None, mass_rounding=mass_rounding)


def check_feasible(patterns: MaskPatterns, r: np.ndarray, *, what: str = "scores", head: int | None = None,
                   mass_rounding: float = 0.0) -> None:  # fmt: skip
    """Raise ``ValueError`` when no plan with cluster weights ``r`` (K,) respects the mask the ``patterns`` were
    collected from, naming clusters that cannot be filled (or samples that cannot be placed) and what to do.

    Nothing is checked when ``patterns.too_large``. ``what`` names the matrix in the message (``-inf scores``);
    ``head``, for batched (H, N, K) problems checked one head at a time, is named in it too. The sample and cluster
    masses are each taken relative to their own total. ``mass_rounding``: the share of the mass that rounding the
    weights to the dtype they were given in may account for (:func:`otlabel.problem.weight_rounding`); a shortfall
    up to it (or :data:`MASS_TOLERANCE`, whichever is larger: :func:`shortfall_tolerance`) is not reported.
    """
    if patterns.too_large:
        return
    r = np.asarray(r, dtype=np.float64).reshape(-1)
    if r.shape != (patterns.num_clusters,):
        raise ValueError(f"r must have shape ({patterns.num_clusters},) to match the patterns, got {r.shape}.")
    total, r_total = patterns.total_weight, float(r.sum())
    if len(patterns) == 0 or total <= 0 or r_total <= 0:
        return  # no masked rows: every sample may go anywhere
    allowed, weights, counts = patterns.patterns()
    c, r = weights / total, r / r_total
    hot_rows, hot_cols = _hot(allowed, c, r)
    if not hot_rows.any():
        return  # no hot pair, so no violation
    # Every pair of a violation is hot: keep the groups and clusters with a hot pair and merge the other clusters into
    # one that every kept group may reach. That network holds every violation, and finds no other.
    rows, positive = np.flatnonzero(hot_rows), r[hot_cols] > 0
    edges = np.ones((len(rows), len(positive) + 1), dtype=bool)  # the last column: the merged clusters
    for block in _row_blocks(edges.shape):  # without a whole copy of the allowed pairs on the way
        np.logical_and(allowed[rows[block]][:, hot_cols], positive, out=edges[block, :-1])
    tolerance = shortfall_tolerance(mass_rounding)
    reached = _reached_clusters(edges, c[hot_rows], np.append(r[hot_cols], r[~hot_cols].sum()), tolerance)
    if reached is not None:
        clusters = ~hot_cols  # the merged clusters are reached along with any group
        clusters[hot_cols] = reached[:-1]
        raise _infeasible_error(clusters, allowed, c, counts, r, patterns, what, head)


def _hot(allowed: np.ndarray, c: np.ndarray, r: np.ndarray):
    """The groups and clusters with a hot pair (``shut[g] + barred[k] > 1``, see the module docstring), the test
    repeated within the groups and clusters the round before kept until neither shrinks (at most
    :data:`MAX_PRUNE_ROUNDS` rounds): (hot rows, hot cols) as bool masks.

    Sound as :func:`prune_hot_rows` is: a group g and cluster k of a violation (A, C) were kept by the round before,
    so ``shut[g] >= r(C)`` and ``barred[k] >= c(A)`` over the kept ones, and the pair passes again. The network then
    holds only what may be part of a violation: of 19,000 random rows over 1,000 clusters, half of them -inf, most
    passed the first round, and the flow network over them took 627 MiB (a streamed solve, whatever its memory
    budget); the second round keeps none of them."""
    rows, cols = np.arange(len(c)), np.ones(len(r), dtype=bool)
    for _ in range(MAX_PRUNE_ROUNDS):
        shut, barred = np.empty(len(rows)), np.zeros(len(r))
        for block in _row_blocks((len(rows), len(r))):
            forbidden = (~allowed[rows[block]] & cols).astype(np.float64)
            shut[block] = forbidden @ r
            barred += c[rows[block]] @ forbidden
        if shut.max() + barred.max() <= 1:  # no hot pair left
            rows = rows[:0]
            break
        keep_rows, keep_cols = np.zeros(len(rows), dtype=bool), np.zeros(len(r), dtype=bool)
        for block in _row_blocks((len(rows), len(r))):
            hot = ~allowed[rows[block]] & cols & (barred > (1 - shut[block])[:, None])
            keep_rows[block] = hot.any(axis=1)
            keep_cols |= hot.any(axis=0)
        if keep_rows.all() and (keep_cols == cols).all():
            break
        rows, cols = rows[keep_rows], keep_cols
        if not len(rows):
            break
    picked = np.zeros(len(allowed), dtype=bool)
    picked[rows] = True
    return picked, cols


def _row_blocks(shape: tuple[int, int]):
    """Slices of rows covering about :data:`BLOCK_ELEMENTS` entries each."""
    n, k = shape
    step = max(1, BLOCK_ELEMENTS // k)
    for start in range(0, n, step):
        yield slice(start, start + step)


SPARSE_FIRST_ABOVE_EDGES = 2**20  # networks with more allowed pairs first try a random part of them (_reached_clusters)
SPARSE_EDGES_PER_GROUP = 8  # a group keeps this many of its pairs in that part (all, if fewer), or more: _sparse_part
SPARSE_MASS_FACTOR = 4  # enough that their clusters weigh about this many times the group
MAX_PART_ROUNDS = 8  # flows on the part, grown by the pairs crossing its cut, before the whole network decides


def _reached_clusters(edges: np.ndarray, c: np.ndarray, r: np.ndarray, tolerance: float) -> np.ndarray | None:
    """The clusters (bool (K,)) reachable from the source in the residual network of a maximum flow, when that flow
    falls short of the groups' mass by more than ``tolerance`` (a share of the mass); ``None`` when it does not.

    ``edges`` (G, K): the allowed pairs into clusters of positive weight; ``c`` (G,), ``r`` (K,): masses summing to
    at most 1 and to 1. The groups reachable in the residual network (the source side of a minimum cut) may only go to
    the reachable clusters, and outweigh them.

    Memory. :func:`~scipy.sparse.csgraph.maximum_flow` takes ~5x its network (it adds the reverse edges, and returns
    the flow on both), so a network of many pairs comes last: with more than :data:`SPARSE_FIRST_ABOVE_EDGES`
    allowed pairs the flow first runs on a random part of them (:func:`_sparse_part`, 8 a group or more). A flow
    there is a flow of the whole network, so when it saturates the groups the verdict is "feasible", as the whole
    network's would be. When it falls short, the part's minimum cut decides if no allowed pair crosses it
    (:func:`_add_crossing_pairs`: then it is a minimum cut of the whole network); otherwise those pairs join the part
    and the flow runs again, up to :data:`MAX_PART_ROUNDS` times, before the whole network decides. The networks are
    written straight into int32 arrays, and the residual network is walked from the flow on the pairs
    (:func:`_source_side`) rather than formed as a matrix. 19,000 distinct rows over 1,000 clusters, 40% of the pairs
    allowed (7.6M, every pair hot): the check took ~660 MiB of host memory with the whole network, ~50 MiB with the
    part; with 10% of the sample mass confined to 5% of the clusters (a violation), ~340 MiB and 3.9 s over the whole
    network, ~40 MiB and 0.8 s on the part (one flow: no pair crossed its cut).
    """
    try:
        from scipy.sparse.csgraph import maximum_flow
    except ImportError:  # SciPy is optional (the "exact" extra): without it only the graph-free cases are decided
        return None

    supply = np.floor(c * FLOW_SCALE).astype(np.int64)  # rounded against a violation: a shortfall is real
    demand = np.ceil(r * FLOW_SCALE).astype(np.int64)
    if not (supply > 0).all():
        edges, supply = edges[supply > 0], supply[supply > 0]
    g, k = edges.shape
    unbounded = int(supply.sum()) + 1
    if max(int(demand.sum()), unbounded) >= 2**31:  # every capacity, and the flow, must fit int32
        raise AssertionError(f"flow capacities overflow int32 (K = {k})")  # unreachable for K < 2**30
    most_short = max(1.0, tolerance * FLOW_SCALE)
    part = _sparse_part(edges, supply, demand) if np.count_nonzero(edges) > SPARSE_FIRST_ABOVE_EDGES else None
    for _ in range(MAX_PART_ROUNDS if part is not None else 0):
        cut = _minimum_cut(maximum_flow, part, supply, demand, unbounded, most_short)
        if cut is None:
            return None  # a flow on some of the pairs saturates the groups: so does one on all of them
        if not _add_crossing_pairs(part, edges, *cut):
            return cut[0]  # the part's minimum cut is one of the whole network: the same verdict and clusters
        if 2 * np.count_nonzero(part) > np.count_nonzero(edges):
            break  # grown to most of the pairs: the whole network is no dearer
    del part
    cut = _minimum_cut(maximum_flow, edges, supply, demand, unbounded, most_short)
    return None if cut is None else cut[0]


def _minimum_cut(maximum_flow, pairs: np.ndarray, supply: np.ndarray, demand: np.ndarray, unbounded: int,
                 most_short: float) -> tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
    """The source side of a minimum cut (clusters, groups: :func:`_source_side`) of the network over the allowed
    ``pairs``, or None where its maximum flow falls short of the groups' supply by at most ``most_short``. The
    network is let go once the flow is found (the flow alone is walked)."""
    g, k = pairs.shape
    result = maximum_flow(_network(pairs, supply, demand, unbounded), g + k, g + k + 1)
    if int(supply.sum()) - int(result.flow_value) <= most_short:
        return None
    return _source_side(result.flow, pairs, supply)


def _add_crossing_pairs(part: np.ndarray, edges: np.ndarray, reached: np.ndarray, reached_groups: np.ndarray) -> bool:
    """Add to ``part`` (in place) the pairs of ``edges`` from the groups on the source side of the part's minimum cut
    (``reached_groups``) to clusters off it (not ``reached``); whether there were any.

    None: the cut is one of the whole network too (only unbounded pairs could cross it, and none does), so its
    capacity, the part's maximum flow, bounds the whole network's, which is at least the part's: the two flows are
    equal, and so are the residual networks' source sides (the pairs added would carry no flow, so give no edge
    back; and none leaves the source side). Otherwise a larger flow must use some of the pairs added."""
    rows, added = np.flatnonzero(reached_groups), False
    for block in _row_blocks((len(rows), len(reached))):
        crossing = edges[rows[block]] & ~reached
        if crossing.any():
            part[rows[block]] |= crossing
            added = True
    return added


def _sparse_part(edges: np.ndarray, supply: np.ndarray, demand: np.ndarray) -> np.ndarray | None:
    """A random part of the allowed pairs ``edges`` (G, K), or ``None`` when it would not be much smaller.

    Each group keeps :data:`SPARSE_EDGES_PER_GROUP` of its pairs drawn at random (all of them if it has fewer; drawn
    one by one with a fixed chance, some groups drew none, and the flow fell short on every random mask), and more
    where those clusters would weigh less than :data:`SPARSE_MASS_FACTOR` times the group: each pair with the chance
    that makes them weigh that much on average (a heavy group, the merge of many identical mask rows, keeps enough
    clusters to take its mass); a cluster left fewer than that many pairs, or pairs from less than that many times its
    weight, keeps more of its own. On random masks a flow on such a part saturates the groups, also with many more
    clusters than groups or uneven cluster weights; where it does not, only its time is lost. The draw is seeded: the
    same work for the same mask (the verdict does not depend on it)."""
    rng, least = np.random.default_rng(0), SPARSE_EDGES_PER_GROUP
    mass, share = supply / supply.sum(), demand / demand.sum()
    part = np.empty_like(edges)
    # einsum reads the bool pairs as they are: `allowed @ share` made a float64 copy of each block and ran BLAS, which
    # took 2-8 ms a block of 1M pairs on a 2-core VM with torch loaded (its threads and BLAS's), einsum 0.4-0.7 ms
    reach, drawn = np.zeros(len(share)), np.zeros(len(share))  # per cluster: the mass of the groups that may go to
    for block in _row_blocks(edges.shape):  # it, and of those the draw kept
        allowed = edges[block]
        room = np.einsum("gk,k->g", allowed, share)  # the weight of each group's clusters
        reach += np.einsum("g,gk->k", mass[block], allowed)
        enough = np.divide(SPARSE_MASS_FACTOR * mass[block], room, out=np.ones(len(room)), where=room > 0)
        keys = np.where(allowed, rng.random(allowed.shape, dtype=np.float32), np.float32(2))  # 2: not allowed
        if least < allowed.shape[1]:  # and the pairs of the smallest keys: at least that many a group
            enough = np.maximum(enough, np.partition(keys, least - 1, axis=1)[:, least - 1])
        part[block] = allowed & (keys <= enough[:, None])
        drawn += np.einsum("g,gk->k", mass[block], part[block])
    # Clusters the draw left few pairs, or pairs from too little mass: each of their pairs kept with the chance of about
    # twice that many, or of twice SPARSE_MASS_FACTOR times their weight. With many more clusters than groups
    # (1,000 x 20,000, 40% allowed) about e^-4 of the clusters drew none, the flow could not fill them, and the whole
    # network was built as well (410 MiB, against 72 with this); with uneven cluster weights (19,000 x 1,000, 40%
    # allowed, weights exponential squared) the heaviest drew too little mass: 387 MiB, against 67 with this.
    degree = np.count_nonzero(edges, axis=0)
    thin = (np.count_nonzero(part, axis=0) < least) | (drawn < SPARSE_MASS_FACTOR * share)
    wanted = np.maximum(
        2 * least / np.maximum(degree, 1),
        np.divide(2 * SPARSE_MASS_FACTOR * share, reach, out=np.ones(len(share)), where=reach > 0),
    )
    chance = np.where(thin, np.minimum(1.0, wanted), 0.0).astype(np.float32)
    if thin.any():
        for block in _row_blocks(edges.shape):
            part[block] |= edges[block] & (rng.random(edges[block].shape, dtype=np.float32) < chance)
    if 2 * np.count_nonzero(part) > np.count_nonzero(edges):
        return None
    return part


def _network(edges: np.ndarray, supply: np.ndarray, demand: np.ndarray, unbounded: int):
    """The flow network as an int32 CSR matrix, written in place block by block: groups 0..G-1 (their allowed
    clusters, capacity ``unbounded``), clusters G..G+K-1 (the sink, capacity ``demand``, where positive), the source
    G+K (each group, capacity ``supply``), the sink G+K+1; each row's columns in order."""
    from scipy.sparse import csr_array

    g, k = edges.shape
    served = demand > 0
    degree = np.count_nonzero(edges, axis=1)
    pairs, served_count = int(degree.sum()), int(served.sum())
    size = pairs + served_count + g
    if size >= 2**31:
        raise AssertionError(f"the flow network has {size} edges: more than int32 indices hold")  # > MAX_PATTERN_EDGES
    indptr = np.zeros(g + k + 3, dtype=np.int32)
    np.cumsum(np.concatenate([degree, served, [g, 0]]), out=indptr[1:], dtype=np.int32)
    indices = np.empty(size, dtype=np.int32)
    capacity = np.empty(size, dtype=np.int32)
    at = 0
    for block in _row_blocks(edges.shape):
        cols = np.nonzero(edges[block])[1]  # row-major: each group's clusters, in order
        indices[at : at + len(cols)] = cols + g
        at += len(cols)
    capacity[:pairs] = unbounded
    indices[pairs : pairs + served_count] = g + k + 1
    capacity[pairs : pairs + served_count] = demand[served]
    indices[pairs + served_count :] = np.arange(g)
    capacity[pairs + served_count :] = supply
    return csr_array((capacity, indices, indptr), shape=(g + k + 2, g + k + 2))


def _source_side(flow, edges: np.ndarray, supply: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The clusters and the groups (bool (K,), (G,)) reachable from the source in the residual network of a maximum
    ``flow`` (its CSR matrix, as :func:`~scipy.sparse.csgraph.maximum_flow` gives it, over the network of
    :func:`_network`), found from the flow on the (group, cluster) pairs alone: a group's pairs are unbounded, so
    always left in the residual network; a cluster reaches back to the groups that send it flow; the source reaches
    the groups whose supply is not used up. ``graph - flow`` and a breadth-first search over it took twice the
    network again."""
    g, k = edges.shape
    # typed empty parts first: a flow whose groups' rows hold no entry at all (a SciPy that drops the explicit zeros
    # of a flow that sends nothing) walks from an empty flow, not into np.concatenate([])
    groups, clusters = [np.empty(0, np.intp)], [np.empty(0, flow.indices.dtype)]
    amounts = [np.empty(0, flow.data.dtype)]
    start, stop = int(flow.indptr[0]), int(flow.indptr[g])  # the groups' rows
    for begin in range(start, stop, BLOCK_ELEMENTS):
        end = min(begin + BLOCK_ELEMENTS, stop)
        cols, values = flow.indices[begin:end], flow.data[begin:end]
        used = np.flatnonzero((values > 0) & (cols >= g) & (cols < g + k))
        groups.append(np.searchsorted(flow.indptr, used + begin, side="right") - 1)
        clusters.append(cols[used] - g)
        amounts.append(values[used])
    groups, clusters, amounts = (np.concatenate(parts) for parts in (groups, clusters, amounts))
    sent = np.bincount(groups, weights=amounts, minlength=g)  # exact: integers far below 2**53
    order = np.argsort(clusters, kind="stable")
    senders, bounds = groups[order], np.searchsorted(clusters[order], np.arange(k + 1))
    reached_groups, reached = sent < supply, np.zeros(k, dtype=bool)
    frontier = np.flatnonzero(reached_groups)
    while len(frontier):
        new = np.zeros(k, dtype=bool)
        for block in _row_blocks((len(frontier), k)):
            new |= edges[frontier[block]].any(axis=0)
        new = np.flatnonzero(new & ~reached)
        reached[new] = True
        lengths = bounds[new + 1] - bounds[new]
        steps = np.repeat(bounds[new] - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
        frontier = np.unique(senders[steps])
        frontier = frontier[~reached_groups[frontier]]
        reached_groups[frontier] = True
    return reached, reached_groups


def _infeasible_error(reached: np.ndarray, allowed: np.ndarray, c: np.ndarray, counts: np.ndarray, r: np.ndarray,
                      patterns: MaskPatterns, what: str, head: int | None) -> ValueError:  # fmt: skip
    """The message for a violation read off a minimum cut, whose source side reaches the clusters ``reached``.

    Two statements hold, and the one naming fewer clusters is made: the samples confined to the reached clusters
    outweigh them, or the other clusters of positive weight need more than the samples that may go to any of them.
    Every sample confined to the reached clusters is counted, not only those of the cut's groups.
    """
    positive = r > 0
    starved = positive & ~reached
    confined = ~(allowed & starved).any(axis=1)  # groups whose clusters of positive weight were all reached
    mass, count = float(c[confined].sum()), int(counts[confined].sum())
    where = "" if head is None else f" (head {head})"
    if not (reached & positive).any():
        return ValueError(
            f"infeasible mask{where}: {_samples(count, mass)} may go to no cluster of positive weight (their other "
            f"{what} are -inf). Allow those samples a cluster with weight (fewer -inf {what}), or drop them."
        )
    if (reached & positive).sum() < starved.sum():
        mass_text, room_text = _apart(mass, float(r[reached].sum()))
        return ValueError(
            f"infeasible mask{where}: {_samples(count, mass, mass_text)} may only go to clusters "
            f"{_names(reached & positive)} (their other {what} are -inf), but those clusters' cluster_weights sum to "
            f"{room_text}, so they cannot take them all. Allow those samples more clusters (fewer -inf {what}) or "
            "raise those clusters' cluster_weights."
        )
    able = max(float(c.sum()) + patterns.unmasked_weight / patterns.total_weight - mass, 0.0)
    able_count = int(counts[~confined].sum()) + patterns.unmasked_count
    need_text, able_text = _apart(float(r[starved].sum()), able)
    may = "no sample of positive weight may go to them"  # (one of weight 0 may, but fills nothing)
    if able_count:
        may = f"only {_samples(able_count, able, able_text)} may go to any of them"
    return ValueError(
        f"infeasible mask{where}: clusters {_names(starved)} need {need_text} of the mass (their cluster_weights), "
        f"but {may} (the other samples' {what} for them are -inf), so they cannot be filled. Allow more pairs "
        f"(fewer -inf {what}) or lower those clusters' cluster_weights."
    )


def _samples(count: int, mass: float, mass_text: str | None = None) -> str:
    mass_text = f"{mass:.3g}" if mass_text is None else mass_text
    return f"{count} sample{'' if count == 1 else 's'} ({mass_text} of the sample mass)"


def _apart(a: float, b: float) -> tuple[str, str]:
    """``a`` and ``b`` with 3 significant digits, or as many more as it takes to tell them apart."""
    for digits in (3, 6, 9, 12):
        a_text, b_text = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if a_text != b_text:
            break
    return a_text, b_text


def _names(clusters: np.ndarray) -> str:
    indices = np.flatnonzero(clusters).tolist()
    shown = ", ".join(str(i) for i in indices[:MAX_NAMED])
    return f"[{shown}, ...] ({len(indices)} clusters)" if len(indices) > MAX_NAMED else f"[{shown}]"
