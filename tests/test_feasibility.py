"""Infeasible masks (no plan meets both marginals) are found and explained; feasible ones, exactly feasible
included, pass. Feasibility is decided independently by the plan's LP (HiGHS)."""

import importlib.util
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import linprog

from otlabel.feasibility import MaskPatterns, check_feasible

INF = float("inf")


def patterns_of(allowed, weights, chunks=1, max_edges=None) -> MaskPatterns:
    allowed, weights = np.asarray(allowed, dtype=bool), np.asarray(weights, dtype=np.float64)
    kwargs = {} if max_edges is None else {"max_edges": max_edges}
    patterns = MaskPatterns(allowed.shape[1], **kwargs)
    for rows in np.array_split(np.arange(len(weights)), chunks):
        patterns.add(allowed[rows], weights[rows])
    return patterns


def as_dict(patterns: MaskPatterns) -> dict:
    allowed, weights, counts = patterns.patterns()
    return {tuple(row): (w, n) for row, w, n in zip(allowed.tolist(), weights.tolist(), counts.tolist(), strict=True)}


def lp_max_mass(allowed, c, r) -> float:
    """The most mass a plan on the allowed pairs can carry with row sums <= c and column sums <= r."""
    rows, cols = np.nonzero(allowed)
    if len(rows) == 0:
        return 0.0
    n, k = allowed.shape
    a_ub = np.zeros((n + k, len(rows)))
    a_ub[rows, np.arange(len(rows))] = 1
    a_ub[n + cols, np.arange(len(rows))] = 1
    result = linprog(-np.ones(len(rows)), A_ub=a_ub, b_ub=np.concatenate([c, r]), bounds=(0, None), method="highs")
    assert result.status == 0, result.message
    return -result.fun


def raises(patterns, r, **kwargs) -> str | None:
    """The message check_feasible raises, or None."""
    try:
        check_feasible(patterns, r, **kwargs)
    except ValueError as error:
        return str(error)
    return None


def example_mask():
    s = torch.randn(50, 5, generator=torch.Generator().manual_seed(0))
    s[1:, :2] = -INF
    return torch.isfinite(s).numpy(), np.full(50, 1 / 50)


def test_example_raises_naming_the_starved_clusters():
    allowed, c = example_mask()
    message = raises(patterns_of(allowed, c), np.full(5, 0.2))
    assert message is not None
    assert message.startswith("infeasible mask: clusters [0, 1] need 0.4 of the mass")
    assert "only 1 sample (0.02 of the sample mass)" in message
    assert "fewer -inf scores" in message and "cluster_weights" in message


def test_exactly_feasible_boundary_passes_and_just_beyond_raises():
    allowed, c = example_mask()
    patterns = patterns_of(allowed, c)
    exact = np.array([0.01, 0.01, 0.98 / 3, 0.98 / 3, 0.98 / 3])  # clusters 0 and 1 take exactly sample 0's 0.02
    assert raises(patterns, exact) is None
    beyond = np.array([0.0101, 0.01, 0.9799 / 3, 0.9799 / 3, 0.9799 / 3])
    message = raises(patterns, beyond, head=3, what="chunk scores")
    assert message is not None
    assert "infeasible mask (head 3): clusters [0, 1] need 0.0201 of the mass" in message
    assert "fewer -inf chunk scores" in message
    # A violation of 1e-7 of the mass: far below what a float32 sum resolves, 15x above the documented price of the
    # integer flow ((groups + K) / 2**30 plus the 1e-9 tolerance). A tolerance of 1e-6 let it through.
    slightly = np.array([0.01 + 1e-7, 0.01, (0.98 - 1e-7) / 3, (0.98 - 1e-7) / 3, (0.98 - 1e-7) / 3])
    message = raises(patterns, slightly)
    assert message is not None and "clusters [0, 1] need 0.0200001 of the mass" in message, message


def test_sample_side_message_when_it_names_fewer_clusters():
    allowed = np.ones((10, 6), dtype=bool)
    allowed[:2, 1:] = False  # samples 0 and 1 may only go to cluster 0
    message = raises(patterns_of(allowed, np.full(10, 0.1)), np.array([0.15, 0.17, 0.17, 0.17, 0.17, 0.17]))
    assert message is not None
    assert "2 samples (0.2 of the sample mass) may only go to clusters [0]" in message
    assert "cluster_weights sum to 0.15" in message


def test_messages_add_up_every_group_and_cluster_they_name():
    """Both statements with more than one group and cluster in them: on the sample side the masses of the groups
    confined to the reached clusters and those clusters' weights are sums; on the cluster side so is the mass of
    the samples (masked or not) that may go to the starved clusters."""
    allowed = np.ones((10, 6), dtype=bool)
    allowed[:2, 1:] = False  # samples 0 and 1 may only go to cluster 0
    allowed[2:4, 2:] = False  # samples 2 and 3 only to clusters 0 and 1
    r = np.array([0.1, 0.15, 0.1875, 0.1875, 0.1875, 0.1875])
    message = raises(patterns_of(allowed, np.full(10, 0.1)), r)
    assert message is not None and ("4 samples (0.4 of the sample mass) may only go to clusters [0, 1]" in message
                                    and "cluster_weights sum to 0.25," in message), message  # fmt: skip
    allowed = np.ones((50, 5), dtype=bool)
    allowed[2:, :2] = False  # clusters 0 and 1 (0.4 of the mass) are open to samples 0 and 1 alone
    allowed[1, 3:] = False  # sample 1 in a masked group of its own, sample 0 unmasked
    message = raises(patterns_of(allowed, np.full(50, 0.02)), np.full(5, 0.2))
    assert message is not None and "clusters [0, 1] need 0.4 of the mass" in message, message
    assert "only 2 samples (0.04 of the sample mass) may go to any of them" in message, message


def test_close_masses_are_printed_apart():
    allowed = np.ones((10, 6), dtype=bool)
    allowed[:2, 1:] = False
    message = raises(patterns_of(allowed, np.full(10, 0.1)), np.array([0.1999, 0.16002, 0.16002, 0.16002, 0.16002,
                                                                         0.16002]))  # fmt: skip
    assert message is not None and "(0.2 of the sample mass)" in message and "sum to 0.1999" in message


def test_samples_with_nowhere_to_go():
    allowed = np.ones((8, 4), dtype=bool)
    allowed[3] = False  # masked everywhere
    allowed[5, 1:] = False  # only cluster 0, which has weight 0
    message = raises(patterns_of(allowed, np.full(8, 1 / 8)), np.array([0.0, 1 / 3, 1 / 3, 1 / 3]))
    assert message is not None
    assert "2 samples (0.25 of the sample mass) may go to no cluster of positive weight" in message


def test_many_clusters_are_elided():
    allowed = np.ones((100, 20), dtype=bool)
    allowed[1:, :10] = False
    message = raises(patterns_of(allowed, np.full(100, 0.01)), np.full(20, 0.05))
    assert message is not None
    assert "clusters [0, 1, 2, 3, 4, 5, 6, 7, ...] (10 clusters) need 0.5" in message


def test_unmasked_rows_by_total():
    """Rows with every cluster allowed, passed by their total, count as rows passed one by one."""
    allowed, c = example_mask()  # row 0 has every cluster allowed, rows 1.. the same masked pattern
    whole = patterns_of(allowed, c)
    split = MaskPatterns(5)
    split.add(allowed[1:], c[1:])
    split.add_unmasked(float(c[0]), 1)
    split.add(allowed[:3], np.zeros(3))  # weight 0: ignored
    assert as_dict(whole) == {(False, False, True, True, True): (pytest.approx(0.98, rel=1e-12), 49)}
    assert as_dict(split) == as_dict(whole)
    assert split.unmasked_count == whole.unmasked_count == 1
    assert split.unmasked_weight == whole.unmasked_weight == 0.02
    assert raises(split, np.full(5, 0.2)) == raises(whole, np.full(5, 0.2))


def test_all_allowed_rows_form_no_pattern():
    patterns = patterns_of(np.ones((30, 4), dtype=bool), np.full(30, 1 / 30))
    assert len(patterns) == 0 and patterns.unmasked_count == 30
    assert patterns.unmasked_weight == pytest.approx(1.0, abs=1e-15)
    assert raises(patterns, np.array([1.0, 0.0, 0.0, 0.0])) is None


def test_chunked_accumulation_matches_one_call():
    rng = np.random.default_rng(5)
    allowed = rng.random((200, 7)) > 0.6
    allowed[rng.random(200) < 0.3] = True
    weights = rng.random(200) * (rng.random(200) > 0.2)
    one = patterns_of(allowed, weights)
    for chunks in (2, 7, 200):
        many = patterns_of(allowed, weights, chunks=chunks)
        assert as_dict(many).keys() == as_dict(one).keys()
        for key, (w, n) in as_dict(one).items():
            assert as_dict(many)[key][0] == pytest.approx(w, rel=1e-12) and as_dict(many)[key][1] == n
        assert many.unmasked_count == one.unmasked_count
        assert many.unmasked_weight == pytest.approx(one.unmasked_weight, rel=1e-12)
    merged = patterns_of(allowed[:80], weights[:80])
    merged.merge(patterns_of(allowed[80:], weights[80:]))
    assert as_dict(merged).keys() == as_dict(one).keys()
    assert {key: n for key, (_, n) in as_dict(merged).items()} == {key: n for key, (_, n) in as_dict(one).items()}


def test_zero_weight_rows_are_ignored():
    allowed = np.ones((6, 3), dtype=bool)
    allowed[0] = False  # masked everywhere, but of weight 0
    allowed[1, 1:] = False
    weights = np.array([0.0, 0.0, 0.25, 0.25, 0.25, 0.25])
    patterns = patterns_of(allowed, weights)
    assert len(patterns) == 0 and patterns.unmasked_count == 4
    assert raises(patterns, np.array([0.0, 0.5, 0.5])) is None


def test_too_large_skips_the_check():
    allowed, c = example_mask()
    allowed[2:, 2] = False  # a second pattern
    patterns = patterns_of(allowed, c, max_edges=5)  # room for one pattern of 5 clusters
    assert patterns.too_large and len(patterns) == 0
    assert raises(patterns, np.full(5, 0.2)) is None  # infeasible, but not checked
    patterns.add(allowed, c)  # ignored from now on
    assert patterns.too_large and len(patterns) == 0
    fits = patterns_of(allowed, c, max_edges=10)
    assert not fits.too_large and len(fits) == 2 and raises(fits, np.full(5, 0.2)) is not None
    merged = patterns_of(allowed[:1], c[:1])
    merged.merge(patterns)
    assert merged.too_large


def dict_grouping(allowed, weights) -> dict:
    """The grouping spelled out, one row at a time: each masked row of positive weight, to its groups' summed weight
    and number of rows."""
    groups = {}
    for row, weight in zip(allowed.tolist(), weights.tolist(), strict=True):
        if weight > 0 and not all(row):
            total, count = groups.get(tuple(row), (0.0, 0))
            groups[tuple(row)] = (total + weight, count + 1)
    return groups


def assert_groups(patterns: MaskPatterns, expected: dict):
    got = as_dict(patterns)
    assert len(patterns) == len(expected) and got.keys() == expected.keys(), (len(got), len(expected))
    for key, (weight, count) in expected.items():
        assert got[key][1] == count and got[key][0] == pytest.approx(weight, rel=1e-12, abs=0), key


def repeated_rows(rng, n, k, pool=6, distinct=0.3):
    """n mask rows over k clusters: most drawn from a few patterns, a share of them random (so mostly distinct),
    some allowed everywhere, with weights of which some are 0."""
    patterns = rng.random((pool, k)) < 0.5
    allowed = patterns[rng.integers(0, pool, n)]
    fresh = rng.random(n) < distinct
    allowed[fresh] = rng.random((int(fresh.sum()), k)) < 0.5
    allowed[rng.random(n) < 0.1] = True
    weights = rng.random(n) * (rng.random(n) > 0.1)
    return allowed, weights


@pytest.mark.parametrize("k", [1, 7, 8, 9, 63, 64, 65, 100, 300])  # a key of one uint64 up to 64 clusters, bytes after
@pytest.mark.parametrize("block_elements", [None, 50])  # one grouping per call, or many merged into the groups
def test_grouping_matches_a_dict_of_rows(k, block_elements, monkeypatch):
    from otlabel import feasibility

    if block_elements is not None:
        monkeypatch.setattr(feasibility, "BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(k)
    allowed, weights = repeated_rows(rng, 700, k)
    expected = dict_grouping(allowed, weights)
    for chunks in (1, 9, 700):
        patterns = patterns_of(allowed, weights, chunks=chunks)
        assert_groups(patterns, expected)
        assert patterns.total_weight == pytest.approx(weights.sum(), rel=1e-12)
    halves = patterns_of(allowed[:300], weights[:300], chunks=4)
    halves.merge(patterns_of(allowed[300:], weights[300:], chunks=5))
    assert_groups(halves, expected)
    sent = MaskPatterns(k)  # as between ranks: each half's groups, packed, then added
    for part in (slice(0, 300), slice(300, None)):
        sent.add_packed(*patterns_of(allowed[part], weights[part]).packed())
    assert_groups(sent, expected)
    assert sent.packed()[0].shape == (len(expected), (k + 7) // 8)


@given(
    st.integers(1, 70).flatmap(
        lambda k: st.tuples(
            arrays(bool, st.tuples(st.integers(0, 40), st.just(k)), elements=st.booleans()),
            st.integers(1, 6),
            st.integers(0, 2**32 - 1),
        )
    )
)
@settings(max_examples=60, deadline=None)
def test_grouping_matches_a_dict_of_rows_on_drawn_masks(drawn):
    mask, chunks, seed = drawn
    rng = np.random.default_rng(seed)
    allowed = np.concatenate([mask, mask[rng.permutation(len(mask))[: len(mask) // 2]]])  # repeats, in any order
    weights = rng.integers(0, 4, len(allowed)) / 4  # zeros included; exact sums
    expected = dict_grouping(allowed, weights)
    patterns = patterns_of(allowed, weights, chunks=min(chunks, max(len(allowed), 1)))
    assert as_dict(patterns) == expected  # weights are multiples of 1/4: every sum is exact
    assert patterns.unmasked_count == int(((weights > 0) & allowed.all(axis=1)).sum())


def test_a_pattern_given_twice_to_add_packed_is_one_group():
    allowed = np.array([[True, False, True], [False, False, True], [True, False, True]])
    packed = np.packbits(allowed, axis=1)
    patterns = MaskPatterns(3)
    patterns.add_packed(packed, np.array([0.25, 0.5, 0.125]), np.array([2.0, 1.0, 3.0]))
    assert as_dict(patterns) == {(True, False, True): (0.375, 5), (False, False, True): (0.5, 1)}
    with pytest.raises(ValueError, match=r"\(G, 1\)"):
        patterns.add_packed(np.zeros((2, 2), dtype=np.uint8), np.ones(2), np.ones(2))


@pytest.mark.parametrize("k", [5, 64, 100])
def test_too_large_is_decided_by_the_number_of_distinct_patterns(k):
    rng = np.random.default_rng(1)
    allowed, weights = repeated_rows(rng, 300, k, pool=4, distinct=0.1)
    distinct = len(dict_grouping(allowed, weights))
    for chunks in (1, 7):
        fits = patterns_of(allowed, weights, chunks=chunks, max_edges=distinct * k)
        assert not fits.too_large and len(fits) == distinct
        over = patterns_of(allowed, weights, chunks=chunks, max_edges=distinct * k - 1)
        assert over.too_large and len(over) == 0


def test_bad_arguments():
    patterns = MaskPatterns(4)
    with pytest.raises(ValueError, match=r"\(T, 4\)"):
        patterns.add(np.ones((3, 5), dtype=bool), np.ones(3))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        check_feasible(patterns, np.ones(3) / 3)


def named_clusters(message: str) -> list[int]:
    return [int(i) for i in re.search(r"clusters \[([\d, ]+)\]", message).group(1).split(", ")]


def assert_names_a_violation(message: str, allowed, c, r):
    """The clusters named are a real Hall violator, by the statement the message makes."""
    if "may go to no cluster of positive weight" in message:
        assert ((allowed & (r > 0)).sum(axis=1)[c > 0] == 0).any()
        return
    named = np.zeros(len(r), dtype=bool)
    named[named_clusters(message)] = True
    if "may only go to clusters" in message:  # the samples confined to them outweigh them
        confined = ~(allowed & (r > 0) & ~named).any(axis=1)
        assert c[confined].sum() > r[named].sum() + 1e-9
    else:  # they need more than the samples that may go to any of them
        assert r[named].sum() > c[(allowed & named).any(axis=1)].sum() + 1e-9


def random_case(rng):
    n, k = int(rng.integers(1, 13)), int(rng.integers(1, 7))
    allowed = rng.random((n, k)) > rng.choice([0.1, 0.3, 0.5, 0.7])
    allowed[rng.random(n) < 0.2] = True
    c = rng.random(n) * (rng.random(n) > 0.15)
    r = rng.random(k) * (rng.random(k) > 0.15)
    if c.sum() == 0 or r.sum() == 0:
        return None
    return allowed, c / c.sum(), r / r.sum()


def decided_cases(rng, count: int, margin: float):
    """(allowed, c, r, mass, feasible) of up to ``count`` random cases, with the LP's verdict; those within ``margin``
    below the boundary (the check's rounding tolerance) are skipped."""
    return with_lp_verdicts((random_case(rng) for _ in range(count)), margin)


def with_lp_verdicts(cases, margin: float):
    """(allowed, c, r, mass, feasible) of each case that is not None, with the LP's verdict, skipping those within
    ``margin`` below the boundary."""
    for case in cases:
        if case is None:
            continue
        allowed, c, r = case
        mass = lp_max_mass(allowed, c, r)
        if 1 - margin <= mass < 1 - 1e-9:
            continue
        yield allowed, c, r, mass, mass >= 1 - 1e-9


def test_agrees_with_the_lp_on_random_problems():
    rng = np.random.default_rng(11)
    verdicts = {True: 0, False: 0}
    for allowed, c, r, mass, feasible in decided_cases(rng, 400, margin=1e-6):
        message = raises(patterns_of(allowed, c, chunks=int(rng.integers(1, 4))), r)
        assert (message is None) == feasible, (allowed, c, r, mass, message)
        if message is not None:
            assert_names_a_violation(message, allowed, c, r)
        verdicts[feasible] += 1
    assert verdicts[True] > 50 and verdicts[False] > 50, verdicts


def test_exactly_feasible_random_problems_pass():
    """Marginals read off a plan on the mask (dyadic entries: the sums are exact) are feasible however tight."""
    rng = np.random.default_rng(12)
    for _ in range(300):
        n, k = int(rng.integers(1, 13)), int(rng.integers(1, 7))
        allowed = rng.random((n, k)) > rng.choice([0.3, 0.6, 0.8])
        plan = allowed * rng.integers(0, 4, size=(n, k)) * 2.0**-10
        if plan.sum() == 0:
            continue
        plan = plan / 2.0 ** np.round(np.log2(plan.sum()))  # still dyadic; the sums need not be 1
        c, r = plan.sum(axis=1), plan.sum(axis=0)
        assert raises(patterns_of(allowed, c), r) is None, (allowed, c, r)
        if (r > 0).sum() > 1:  # move a little weight between two clusters: still feasible, or a real violation
            i, j = rng.choice(np.flatnonzero(r > 0), 2, replace=False)
            moved = r.copy()
            moved[i] -= r[i] / 2
            moved[j] += r[i] / 2
            mass = lp_max_mass(allowed, c / c.sum(), moved / moved.sum())
            if mass >= 1 - 1e-9 or mass < 1 - 1e-6:
                assert (raises(patterns_of(allowed, c), moved) is None) == (mass >= 1 - 1e-9)


def test_exactly_feasible_tight_clusters_with_non_dyadic_weights_pass():
    """A tight set of 8 clusters (samples A fill them exactly) whose weights are not multiples of 2**-30, with hot
    pairs so that the flow runs: the clusters' capacities must be rounded up. Rounded down, the flow fell ~3 units
    (of 2**30) short and this feasible mask was refused, as in the dyadic random cases it never is."""
    from otlabel.feasibility import check_dense_mask

    k = 12
    allowed = np.ones((100, k), dtype=bool)
    allowed[:30, 8:] = False  # A (0.3): clusters 0-7 only, which weigh 0.3 together
    allowed[30:40] = False
    allowed[30:40, 8] = True  # B (0.1): cluster 8 only, of weight 0.1
    allowed[40:50] = False
    allowed[40:50, 9] = True  # E (0.1): cluster 9 only, of weight 0.1; the other 50 samples go anywhere
    c = np.full(100, 0.01)
    r = np.array([0.3 / 8] * 8 + [0.1, 0.1, 0.25, 0.25])
    assert lp_max_mass(allowed, c, r) >= 1 - 1e-9  # feasible, by the LP
    assert raises(patterns_of(allowed, c), r) is None
    scores = torch.where(torch.from_numpy(allowed), 0.0, -np.inf).double()
    check_dense_mask(scores[None], torch.from_numpy(c), torch.from_numpy(r), batched=False)  # raises if refused


def test_zero_weight_samples_are_not_counted_in_the_message():
    """check_dense_mask counts the samples outside the hot pairs by their weight: 10 unmasked samples of weight 0
    are not among the samples that 'may go' to the starved clusters (they were counted: '11 samples')."""
    from otlabel.feasibility import check_dense_mask

    scores = torch.zeros(60, 5, dtype=torch.float64)
    scores[1:50, :2] = -INF  # as example_mask: only sample 0 may go to clusters 0 and 1
    weights = torch.cat([torch.full((50,), 1 / 50, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)])
    with pytest.raises(ValueError) as info:
        check_dense_mask(scores[None], weights, torch.full((5,), 0.2, dtype=torch.float64), batched=False)
    assert "clusters [0, 1] need 0.4 of the mass" in str(info.value)
    assert "only 1 sample (0.02 of the sample mass) may go to any of them" in str(info.value)
    assert "(head" not in str(info.value)  # unbatched: no head to name


def test_hot_pairs_that_are_feasible():
    """Masks whose forbidden pairs are heavy on both sides (the flow runs) but admit a plan: a block diagonal."""
    allowed = np.zeros((40, 4), dtype=bool)
    allowed[:20, :2] = True
    allowed[20:, 2:] = True
    c = np.full(40, 1 / 40)
    assert raises(patterns_of(allowed, c), np.full(4, 0.25)) is None
    message = raises(patterns_of(allowed, c), np.array([0.3, 0.3, 0.2, 0.2]))
    assert message is not None and "clusters [0, 1] need 0.6 of the mass" in message


def test_the_on_device_hot_pair_filter_agrees_with_the_lp():
    """check_dense_mask (what sinkhorn_assign runs) sends only samples with a hot pair to the flow: the verdict must be
    the LP's all the same, per head of a batched problem."""
    from otlabel.feasibility import check_dense_mask

    rng = np.random.default_rng(12)
    verdicts = {True: 0, False: 0}
    for allowed, c, r, mass, feasible in decided_cases(rng, 300, margin=1e-5):  # + the float32 sums' margin
        scores = torch.where(torch.from_numpy(allowed), torch.randn(allowed.shape, dtype=torch.float64), -np.inf)
        heads = torch.stack([torch.zeros_like(scores), scores])  # head 0 unmasked, head 1 the case
        try:
            check_dense_mask(heads, torch.from_numpy(c), torch.from_numpy(r), batched=True)
            message = None
        except ValueError as error:
            message = str(error)
        assert (message is None) == feasible, (allowed, c, r, mass, message)
        if message is not None:
            assert "(head 1)" in message
            assert_names_a_violation(message, allowed, c, r)
        verdicts[feasible] += 1
    assert verdicts[True] > 50 and verdicts[False] > 50, verdicts


def test_tight_masks_with_uneven_weights_are_not_refused():
    """Found in review: the masses went through float32 (0.7 -> 0.699999988), and a plan that exists only exactly
    (sample 0 must fill cluster 0 alone) was refused on every entry point."""
    from otlabel import sinkhorn_assign, sinkhorn_assign_sharded, sinkhorn_assign_stream

    scores = torch.tensor([[0.0, -np.inf], [0.0, 0.0]])
    weights = dict(sample_weights=torch.tensor([0.3, 0.7]), cluster_weights=torch.tensor([0.3, 0.7]))
    for backend in ("torch", "reference"):
        assert sinkhorn_assign(scores, 0.1, backend=backend, **weights).converged
    assert sinkhorn_assign_stream(scores.numpy(), 0.1, **weights).converged
    assert sinkhorn_assign_sharded(scores, 0.1, **weights).converged


def test_tight_masks_with_float32_weights_are_not_refused():
    """Found by a numerics hunt: float32 cluster weights [3/7, 4/7] (0.428571433, 0.571428597) leave 4/7 rounded
    up, and the 4 of 7 samples that may go to cluster 1 (0.571428571) cannot fill it: a 1e-8 shortfall, 10x the
    float64 tolerance, refused on every entry point. The same with float32 sample weights. The allowance is now
    the rounding of the dtype the weights came in; a violation beyond it is still refused."""
    from otlabel import exact_plan, sinkhorn_assign, sinkhorn_assign_sharded, sinkhorn_assign_stream

    scores = torch.zeros(7, 2)
    scores[:3, 1] = -np.inf  # samples 0-2 may only go to cluster 0
    cases = [dict(cluster_weights=torch.tensor([3 / 7, 4 / 7])),  # float32 cluster weights, uniform samples
             dict(sample_weights=torch.tensor([0.1] * 3 + [0.175] * 4),  # float32 sample weights
                  cluster_weights=torch.tensor([0.3, 0.7], dtype=torch.float64))]  # fmt: skip
    for weights in cases:
        r = weights["cluster_weights"].double()
        c = weights.get("sample_weights", torch.full((7,), 1 / 7)).double()
        shortfall = float(c[:3].sum() / c.sum() - r[0] / r.sum())
        assert 2e-9 < shortfall < 2e-8  # beyond the float64 tolerance, within float32's rounding
        assert raises(patterns_of(~torch.isneginf(scores).numpy(), c.numpy()), r.numpy()) is not None  # as float64
        for backend in ("torch", "reference"):
            assert sinkhorn_assign(scores, 0.1, backend=backend, **weights).converged
        assert sinkhorn_assign_stream(scores.numpy(), 0.1, **weights).converged
        assert sinkhorn_assign_sharded(scores, 0.1, **weights).converged
        for method in ("pot", "linprog") if importlib.util.find_spec("ot") else ("linprog",):
            exact = exact_plan(scores, method=method, **weights)  # the rounding's 1e-8 of forbidden mass dropped
            assert (exact.labels[:3] == 0).all() and float(exact.plan[:3, 1].sum()) == 0, method
    beyond = torch.tensor([3 / 7 - 1e-6, 4 / 7 + 1e-6])  # the 3 confined samples outweigh cluster 0 by 1e-6
    for solve in (sinkhorn_assign, sinkhorn_assign_stream, sinkhorn_assign_sharded):
        with pytest.raises(ValueError, match=r"infeasible mask"):
            solve(scores.numpy() if solve is sinkhorn_assign_stream else scores, 0.1, cluster_weights=beyond)
    with pytest.raises(ValueError, match=r"infeasible mask"):
        exact_plan(scores, cluster_weights=beyond, method="linprog")


def test_weight_rounding_is_one_unit_of_the_given_dtype():
    from otlabel.problem import weight_rounding

    assert weight_rounding(None, 10) == 0.0
    assert weight_rounding([0.5, 0.5], 2) == 0.0  # Python numbers are read as float64, exactly
    assert weight_rounding(torch.tensor([1, 1]), 2) == 0.0
    assert weight_rounding(torch.ones(2, dtype=torch.float64), 2) < 1e-15
    assert weight_rounding(np.ones(2, dtype=np.float32), 2) == pytest.approx(2.0**-23)
    assert weight_rounding(torch.ones(2), 2) == pytest.approx(2.0**-23)
    assert weight_rounding(torch.ones(2, dtype=torch.bfloat16), 2) == pytest.approx(2.0**-7)
    # fp16's subnormals are 6e-8 apart: 100,000 of them may be off by 3e-3 together
    fp16 = torch.ones(100_000, dtype=torch.float16)
    assert weight_rounding(fp16, 100_000) == pytest.approx(2.0**-10 + 1e5 * 2.0**-24)


def test_a_small_violation_among_millions_of_samples_is_found():
    """Found in review: float32 sums of the hot-pair test were off by ~2e-4 over 4M samples and let a mask
    infeasible by 8e-5 through (the solve then stalled with advice to raise max_iter); the sums are float64."""
    from otlabel import sinkhorn_assign

    g = torch.Generator().manual_seed(0)
    n = 4_000_000
    c = torch.rand(n, dtype=torch.float64, generator=g) + 0.5
    c /= c.sum()
    confined = torch.rand(n, generator=g) < 0.5  # these samples may only go to cluster 0
    scores = torch.zeros(n, 2)
    scores[confined, 1] = -np.inf
    mass = float(c[confined].sum())
    assert 5e-5 < mass - 0.5 < 2e-4  # infeasible with equal cluster weights, by that much
    with pytest.raises(ValueError, match=r"infeasible mask"):
        sinkhorn_assign(scores, 0.05, sample_weights=c, cluster_weights=torch.tensor([0.5, 0.5]), tol=None, max_iter=1)
    exact = torch.tensor([mass, 1 - mass], dtype=torch.float64)  # exactly feasible
    sinkhorn_assign(scores, 0.05, sample_weights=c, cluster_weights=exact, tol=None, max_iter=1)


def test_a_streamed_pass_groups_its_masked_rows_in_blocks(monkeypatch):
    """Found in review: the streamed check read `too_large` (which groups the held rows first) once per chunk, so
    each chunk of a few rows was grouped on its own (12,457 groupings of ~4 rows at a small memory_budget)."""
    from otlabel import feasibility, sinkhorn_assign_stream

    groupings = []
    flush = feasibility.MaskPatterns._flush

    def counted(self):
        if self._pending:
            groupings.append(self._pending_rows)
        flush(self)

    monkeypatch.setattr(feasibility.MaskPatterns, "_flush", counted)
    scores = np.random.default_rng(0).standard_normal((4000, 64)).astype(np.float32)
    scores[::2, 5] = -np.inf  # half the rows masked (feasible)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small budget is warned about: chunks of 64 rows, on purpose
        sinkhorn_assign_stream(scores, 0.1, tol=None, max_iter=1, memory_budget=2**14)
    rows_per_block = feasibility.BLOCK_ELEMENTS // 64
    assert sum(groupings) == 2000 and len(groupings) <= 2000 // rows_per_block + 2, groupings[:10]


def test_a_mask_far_from_halls_bound_is_decided_by_the_sums_alone(monkeypatch):
    """30 samples, each closed to one of 3 clusters (12 to cluster 0): every forbidden pair has shut + barred <= 0.74,
    so none is hot within the float32 sums' margin, (rows + K + 2) * 2**-24, and no mask row is collected. The margin
    was read off a block's nominal length (2**24 / K rows whatever N): 1/3 here, which made these pairs hot."""
    from otlabel import feasibility

    def never(*args):
        raise AssertionError("hot_patterns ran: some pair counted as hot")

    monkeypatch.setattr(feasibility, "hot_patterns", never)
    scores = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    closed = np.r_[np.zeros(12, dtype=int), np.arange(18) % 2 + 1]  # barred: 0.4, 0.3, 0.3
    scores[np.arange(30), closed] = -INF
    c, r = torch.full((30,), 1 / 30, dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
    shut, barred, margin = feasibility.hot_sums(scores, c, r)
    assert margin == (30 + 3 + 2) * 2.0**-24 and float(shut.max() + barred.max()) < 0.74
    feasibility.check_dense_mask(scores[None], c, r, batched=False)


@pytest.fixture
def always_prune(monkeypatch):
    """Pruning to the fixed point even where the rows kept would be few enough to group (every mask here)."""
    from otlabel import feasibility

    monkeypatch.setattr(feasibility, "PRUNE_ABOVE_EDGES", -1)


def dense_verdict(allowed, c, r, heads: int = 1, prune: bool = True, monkeypatch=None) -> str | None:
    """The message check_dense_mask raises on the mask (the same one in each of ``heads`` heads but the first, which
    is unmasked when there are several), or None; ``prune=False``: with one round of the hot-pair test, as before."""
    from otlabel import feasibility

    scores = torch.where(torch.from_numpy(allowed), torch.randn(allowed.shape, dtype=torch.float64), -np.inf)
    if heads > 1:
        scores = torch.stack([torch.zeros_like(scores)] + [scores] * (heads - 1))
    else:
        scores = scores[None]
    if not prune:
        one_round = feasibility.hot_patterns
        monkeypatch.setattr(feasibility, "hot_patterns", lambda *args, prune: one_round(*args))
    try:
        feasibility.check_dense_mask(scores, torch.from_numpy(c), torch.from_numpy(r), batched=heads > 1)
    except ValueError as error:
        return str(error)
    finally:
        if not prune:
            monkeypatch.setattr(feasibility, "hot_patterns", one_round)
    return None


def planted_case(rng, zero_weights: bool = False):
    """A random mask (up to 80 x 12) with a planted near-violation: samples closed to a random set of clusters, and
    uneven weights (some zero when ``zero_weights``)."""
    n, k = int(rng.integers(5, 80)), int(rng.integers(2, 12))
    allowed = rng.random((n, k)) > rng.choice([0.2, 0.5, 0.7])
    allowed[np.ix_(rng.random(n) < rng.uniform(0.05, 0.6), rng.random(k) < rng.uniform(0.2, 0.8))] = False
    c, r = rng.random(n) + 0.05, rng.random(k) + 0.05
    if zero_weights:
        c *= rng.random(n) > 0.1
        r *= rng.random(k) > 0.2
    if c.sum() == 0 or r.sum() == 0:
        return None
    return allowed, c / c.sum(), r / r.sum()


@pytest.mark.parametrize("zero_weights", [False, True])
def test_pruned_hot_rows_give_the_verdict_and_message_of_the_exact_check_on_every_row(
    zero_weights, monkeypatch, always_prune
):
    """check_dense_mask prunes the hot samples to a fixed point before the exact check: its verdict and message must
    be those of the exact check on every row of the mask, and those of one round of the hot-pair test (as before),
    per head, on feasible and infeasible masks, tight and near-tight ones included."""
    rng = np.random.default_rng(40 + zero_weights)
    verdicts = {True: 0, False: 0}
    for case_index in range(400):
        case = planted_case(rng, zero_weights)
        if case is None:
            continue
        allowed, c, r = case
        if case_index % 4 == 0:  # near-tight: a cluster's weight set to what the samples confined to it carry
            column = int(rng.integers(len(r)))
            only = allowed[:, column] & (allowed.sum(axis=1) == 1)
            r[column] = c[only].sum() + rng.choice([0.0, 1e-6, -1e-6])
            if r.sum() <= 0 or (r < 0).any():
                continue
            r = r / r.sum()
        heads = int(rng.integers(1, 4))
        exact = raises(patterns_of(allowed, c), r, head=1 if heads > 1 else None)
        mass = lp_max_mass(allowed, c, r)
        if 1 - 1e-5 <= mass < 1 - 1e-9:
            continue  # within the float32 sums' margin and the flow's tolerance: either verdict may come
        assert (exact is None) == (mass >= 1 - 1e-9), (allowed, c, r, mass, exact)
        assert dense_verdict(allowed, c, r, heads) == exact, (allowed, c, r)
        assert dense_verdict(allowed, c, r, heads, prune=False, monkeypatch=monkeypatch) == exact, (allowed, c, r)
        verdicts[exact is None] += 1
    assert verdicts[True] > 40 and verdicts[False] > 40, verdicts


def test_exactly_feasible_tight_masks_pass_after_pruning(always_prune):
    """Marginals read off a plan on the mask (dyadic entries: the sums are exact), however tight, pass pruned."""
    rng = np.random.default_rng(13)
    for _ in range(200):
        n, k = int(rng.integers(2, 60)), int(rng.integers(2, 10))
        allowed = rng.random((n, k)) > rng.choice([0.3, 0.6, 0.8])
        plan = allowed * rng.integers(0, 4, size=(n, k)) * 2.0**-10
        if plan.sum() == 0:
            continue
        plan = plan / 2.0 ** np.round(np.log2(plan.sum()))
        c, r = plan.sum(axis=1), plan.sum(axis=0)
        c, r = c / c.sum(), r / r.sum()
        assert dense_verdict(allowed, c, r) is None, (allowed, c, r)


def test_a_violation_isolated_over_several_pruning_rounds(monkeypatch, always_prune):
    """A mask (found by a seeded search) whose hot samples shrink over several rounds, 43 -> 37 -> 34 -> ... -> 30
    (29 samples confined to 4 clusters): the rounds keep the violation, and the pruned check names the clusters the
    exact check on every row names."""
    from otlabel import feasibility

    rng = np.random.default_rng(50)
    n, k = int(rng.integers(10, 80)), int(rng.integers(3, 12))
    allowed = rng.random((n, k)) > rng.choice([0.3, 0.5, 0.7])
    allowed[np.ix_(rng.random(n) < rng.uniform(0.1, 0.5), rng.random(k) < 0.5)] = False
    c, r = rng.random(n) + 0.1, rng.random(k) + 0.1
    c, r = c / c.sum(), r / r.sum()
    scores = torch.where(torch.from_numpy(allowed), 0.0, -np.inf)
    ct, rt = torch.from_numpy(c), torch.from_numpy(r)
    kept = []
    for rounds in (1, 2, 3, 20):
        monkeypatch.setattr(feasibility, "MAX_PRUNE_ROUNDS", rounds)
        kept.append(feasibility.prune_hot_rows(scores, ct, rt, *feasibility.hot_sums(scores, ct, rt)).tolist())
    assert [len(rows) for rows in kept] == [43, 37, 34, 30]
    assert all(set(later) <= set(earlier) for earlier, later in zip(kept, kept[1:], strict=False))
    exact = raises(patterns_of(allowed, c), r)
    assert exact is not None and "29 samples (0.465 of the sample mass) may only go to clusters [2, 3, 4, 7]" in exact
    for rounds in (1, 2, 20):  # a cap on the rounds leaves more samples, and the same verdict
        monkeypatch.setattr(feasibility, "MAX_PRUNE_ROUNDS", rounds)
        assert dense_verdict(allowed, c, r) == exact
    assert_names_a_violation(exact, allowed, c, r)


def test_pruning_a_large_random_mask_leaves_no_sample_and_collects_no_row(monkeypatch, always_prune):
    """50% random -inf over 20,000 x 50: most samples have a hot pair in round 1, none is left at the fixed point, so
    no mask row leaves the device (and a violation planted in it is still found, naming its clusters)."""
    from otlabel import feasibility

    g = torch.Generator().manual_seed(3)
    scores = torch.randn(20_000, 50, generator=g)
    scores[torch.rand(scores.shape, generator=g) < 0.5] = -np.inf
    c, r = torch.full((20_000,), 1 / 20_000, dtype=torch.float64), torch.full((50,), 1 / 50, dtype=torch.float64)
    shut, barred, margin = feasibility.hot_sums(scores, c, r)
    assert float(shut.max() + barred.max()) > 1  # the one-round test fires
    assert len(feasibility.prune_hot_rows(scores, c, r, shut, barred, margin)) == 0
    added = []
    monkeypatch.setattr(feasibility.MaskPatterns, "add", lambda self, allowed, weights: added.append(len(weights)))
    feasibility.check_dense_mask(scores[None], c, r, batched=False)
    assert added == []
    monkeypatch.undo()
    scores[:3000, :10] = 0.0  # 15% of the samples confined to clusters 0-9 (weight 0.2): they fit
    scores[:3000, 10:] = -np.inf
    feasibility.check_dense_mask(scores[None], c, r, batched=False)
    scores[3000:5000, :10] = 0.0  # 25%: they do not
    scores[3000:5000, 10:] = -np.inf
    exact = raises(patterns_of(~torch.isneginf(scores).numpy(), c.numpy()), r.numpy())
    assert "5000 samples (0.25 of the sample mass) may only go to clusters [0, 1, 2, 3, 4, 5, 6, 7, ...]" in exact
    with pytest.raises(ValueError) as info:
        feasibility.check_dense_mask(scores[None], c, r, batched=False)
    assert str(info.value) == exact


def test_pruning_stops_once_the_rows_kept_are_few_enough_to_group(monkeypatch):
    """On the CPU more rounds cost more than grouping what one round keeps, when that fits MaskPatterns: pruning stops
    there (``PRUNE_ABOVE_EDGES``), and goes on to the fixed point only above it."""
    import math

    from otlabel import feasibility

    g = np.random.default_rng(3)
    n, k = 2000, 20
    allowed = g.random((n, k)) > 0.5
    allowed[:, 0] = True
    scores = torch.where(torch.from_numpy(allowed), 0.0, -math.inf)
    c, r = torch.full((n,), 1 / n, dtype=torch.float64), torch.full((k,), 1 / k, dtype=torch.float64)
    sums = feasibility.hot_sums(scores, c, r)
    one_round = feasibility.prune_hot_rows(scores, c, r, *sums)
    assert 0 < len(one_round) * k <= feasibility.PRUNE_ABOVE_EDGES
    monkeypatch.setattr(feasibility, "PRUNE_ABOVE_EDGES", -1)
    pruned = feasibility.prune_hot_rows(scores, c, r, *sums)
    assert len(pruned) < len(one_round)
    assert set(pruned.tolist()) <= set(one_round.tolist())


def test_a_streamed_random_mask_builds_no_flow_network(monkeypatch):
    """Streamed (and sharded) solves give check_feasible every masked row, and it ran the hot-pair test once: on a
    random mask with half the pairs -inf most rows passed it (1,415 of these 2,000), and the max-flow network was
    built over them (19,000 x 1,000: 627 MiB of host memory whatever the memory budget, against 20 MiB in memory,
    where the rows are pruned first). Repeated within the rows and clusters kept, the test leaves none, as in memory;
    the verdict is the same (the solve's labels match the in-memory ones)."""
    from otlabel import feasibility, sinkhorn_assign, sinkhorn_assign_stream

    networks, real = [], feasibility._reached_clusters
    monkeypatch.setattr(
        feasibility, "_reached_clusters", lambda edges, *a: networks.append(edges.shape) or real(edges, *a)
    )
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((2000, 100), dtype=np.float32)
    scores[rng.random(scores.shape) < 0.5] = -np.inf
    res = sinkhorn_assign_stream(scores, 0.5, max_iter=5, tol=None)
    assert networks == []
    assert torch.equal(res.labels, sinkhorn_assign(torch.from_numpy(scores), 0.5, max_iter=5, tol=None).labels)
    # An infeasible mask within it is still found: 100 samples allowed only cluster 0, whose share is 20 samples
    scores[:100] = -np.inf
    scores[:100, 0] = 0.0
    with pytest.raises(ValueError, match=r"infeasible mask: 100 samples .* may only go to clusters \[0\]"):
        sinkhorn_assign_stream(scores, 0.5, max_iter=5, tol=None)


def flow_networks(monkeypatch) -> list[int]:
    """The number of edges of every network given to maximum_flow from now on."""
    import scipy.sparse.csgraph

    sizes, real = [], scipy.sparse.csgraph.maximum_flow
    monkeypatch.setattr(scipy.sparse.csgraph, "maximum_flow", lambda graph, *a, **kw: sizes.append(graph.nnz) or
                        real(graph, *a, **kw))  # fmt: skip
    return sizes


def test_a_dense_random_mask_is_decided_on_a_part_of_its_pairs(monkeypatch):
    """5,000 x 700 with 40% of the pairs allowed (1.4M): every pair is hot (shut ~0.6, barred ~0.6), so the flow
    decides, and it ran on the whole network (at 19,000 x 1,000: ~700 MiB of host memory, 5 s). A flow on a random
    part of the pairs (8 a sample) already places every sample: the verdict is the same. A violation planted in the
    mask is found and named on the part too: no allowed pair crosses its cut (the whole network, 5x the pairs, was
    built for it: ~370 MiB at 19,000 x 1,000)."""
    rng = np.random.default_rng(5)
    n, k = 5000, 700
    allowed = rng.random((n, k)) < 0.4
    c, r = np.full(n, 1 / n), np.full(k, 1 / k)
    networks = flow_networks(monkeypatch)
    assert raises(patterns_of(allowed, c), r) is None
    assert networks and max(networks) < allowed.sum() / 10, networks
    allowed[:500] = False
    allowed[:500, :30] = True  # 10% of the mass confined to clusters 0-29, of weight 0.043
    networks.clear()
    message = raises(patterns_of(allowed, c), r)
    assert message is not None and "500 samples (0.1 of the sample mass) may only go to clusters [0, 1, 2" in message
    assert "(30 clusters)" in message and "cluster_weights sum to 0.0429," in message, message
    assert len(networks) == 1 and networks[0] < allowed.sum() / 10, networks  # no pair crosses the part's cut


def test_a_wide_dense_random_mask_is_decided_on_a_part_of_its_pairs(monkeypatch):
    """With many more clusters than samples (300 x 4,000, 40% allowed: 480,000 pairs, the part's threshold lowered)
    8 pairs a sample left ~2% of the clusters none: the flow could not fill them and the whole network was built
    too. Clusters left few pairs keep more of their own: the part alone decides."""
    from otlabel import feasibility

    monkeypatch.setattr(feasibility, "SPARSE_FIRST_ABOVE_EDGES", 100_000)
    rng = np.random.default_rng(6)
    n, k = 300, 4000
    allowed = rng.random((n, k)) < 0.4
    networks = flow_networks(monkeypatch)
    assert raises(patterns_of(allowed, np.full(n, 1 / n)), np.full(k, 1 / k)) is None
    assert len(networks) == 1 and networks[0] < allowed.sum() / 5, networks


def test_a_dense_random_mask_with_uneven_cluster_weights_is_decided_on_a_part_of_its_pairs(monkeypatch):
    """With uneven cluster weights (2,000 x 300, 40% allowed, weights exponential squared; the part's threshold
    lowered) the heaviest clusters drew at least 8 pairs, but too little mass to fill them: the flow on the part fell
    short and the whole network was built too (19,000 x 1,000: 387 MiB against 67). Clusters the draw left too
    little mass keep more of their pairs: the part alone decides."""
    from otlabel import feasibility

    monkeypatch.setattr(feasibility, "SPARSE_FIRST_ABOVE_EDGES", 100_000)
    rng = np.random.default_rng(7)
    n, k = 2000, 300
    allowed = rng.random((n, k)) < 0.4
    r = rng.exponential(size=k) ** 2
    networks = flow_networks(monkeypatch)
    assert raises(patterns_of(allowed, np.full(n, 1 / n)), r / r.sum()) is None
    assert len(networks) == 1 and networks[0] < allowed.sum() / 5, networks


def residual_reach(edges, c, r) -> np.ndarray | None:
    """The clusters on the source side of a minimum cut, by a breadth-first search over the residual network formed
    as a matrix (graph - flow), or None when the flow saturates the groups: a reference for _source_side."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import breadth_first_order, maximum_flow

    from otlabel.feasibility import FLOW_SCALE

    supply, demand = np.floor(c * FLOW_SCALE).astype(np.int64), np.ceil(r * FLOW_SCALE).astype(np.int64)
    edges, supply = edges[supply > 0], supply[supply > 0]
    g, k = edges.shape
    rows, cols = np.nonzero(edges)
    served = np.flatnonzero(demand > 0)
    heads = np.concatenate([rows, g + served, np.full(g, g + k)])
    tails = np.concatenate([g + cols, np.full(len(served), g + k + 1), np.arange(g)])
    capacity = np.concatenate([np.full(len(rows), supply.sum() + 1), demand[served], supply]).astype(np.int32)
    graph = csr_array((capacity, (heads, tails)), shape=(g + k + 2, g + k + 2))
    result = maximum_flow(graph, g + k, g + k + 1)
    if supply.sum() - result.flow_value <= 1:
        return None
    residual = (graph - result.flow).tocsr()
    residual.data = (residual.data > 0).astype(np.int8)
    residual.eliminate_zeros()
    reached = breadth_first_order(residual, g + k, return_predecessors=False)
    return np.isin(np.arange(g, g + k), reached)


def planted_cases(rng, count: int, margin: float):
    """As decided_cases, over planted_case's masks (up to 80 x 12, zero weights in some) and, every third, a mask with
    a few -inf scores a sample (mostly feasible, with room to spare)."""

    def case(index: int):
        if index % 3 != 2:
            return planted_case(rng, zero_weights=index % 2 == 1)
        n, k = int(rng.integers(20, 80)), int(rng.integers(3, 12))
        allowed, c, r = rng.random((n, k)) > 0.2, rng.random(n) + 0.1, rng.random(k) + 0.1
        return allowed, c / c.sum(), r / r.sum()

    return with_lp_verdicts(map(case, range(count)), margin)


def test_the_part_first_and_the_residual_walk_give_the_verdict_and_cut_of_the_whole_network(monkeypatch):
    """Forced onto every network (and with 1 to 3 pairs a group, so that it often falls short on feasible masks too):
    the flows on a random part of the pairs, grown by the pairs that cross its cut, then on the whole network, give
    the verdict of the LP, and the clusters on the source side of the cut, walked from the flow on the pairs, are
    those a search over the residual network formed as a matrix finds. Each way of deciding is taken many times:
    on the part as drawn, on the part grown, and on the whole network (the part grown to most of the pairs, or its
    rounds used up)."""
    from otlabel import feasibility

    monkeypatch.setattr(feasibility, "SPARSE_FIRST_ABOVE_EDGES", -1)
    parts, networks = [], []
    real_part, real_network = feasibility._sparse_part, feasibility._network
    monkeypatch.setattr(feasibility, "_sparse_part", lambda *args: parts.append(real_part(*args)) or parts[-1])
    monkeypatch.setattr(feasibility, "_network", lambda edges, *args: networks.append(
        "part" if parts and edges is parts[0] else "whole") or real_network(edges, *args))  # fmt: skip
    rng = np.random.default_rng(21)
    verdicts, ways = {True: 0, False: 0}, {"drawn": 0, "grown": 0, "whole": 0}
    for allowed, c, r, mass, feasible in planted_cases(rng, 400, margin=1e-6):
        monkeypatch.setattr(feasibility, "SPARSE_EDGES_PER_GROUP", int(rng.integers(1, 4)))
        monkeypatch.setattr(feasibility, "SPARSE_MASS_FACTOR", float(rng.choice([0, 1, 4])))
        monkeypatch.setattr(feasibility, "MAX_PART_ROUNDS", int(rng.choice([1, 2, 8])))  # 1, 2: rounds run out too
        networks.clear()
        parts.clear()
        reached = feasibility._reached_clusters(allowed & (r > 0), c, r, feasibility.MASS_TOLERANCE)
        expected = residual_reach(allowed & (r > 0), c, r)
        assert (reached is None) == (expected is None) == feasible, (allowed, c, r, mass)
        assert reached is None or (reached == expected).all(), (allowed, c, r, reached, expected)
        if parts[0] is not None:
            ways["whole" if "whole" in networks else "grown" if len(networks) > 1 else "drawn"] += 1
        verdicts[feasible] += 1
    assert verdicts[True] > 50 and verdicts[False] > 50, verdicts
    assert min(ways.values()) > 10, ways


def test_the_cut_walks_from_a_flow_that_stores_no_entries():
    """A flow matrix with nothing stored in the groups' rows (a SciPy that drops the zeros of a flow that sends
    nothing) is walked as the zero flow: every group with supply is reached, and every cluster one of them may use
    (np.concatenate of no parts raised)."""
    from scipy.sparse import csr_array

    from otlabel.feasibility import _source_side

    edges = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)  # 3 groups x 3 clusters
    supply = np.array([5, 0, 2])
    size = edges.shape[0] + edges.shape[1] + 2
    empty_flow = csr_array((np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(size + 1, np.int32)), (size, size))
    reached, reached_groups = _source_side(empty_flow, edges, supply)
    assert reached.tolist() == [True, False, False] and reached_groups.tolist() == [True, False, True]
