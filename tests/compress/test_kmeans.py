"""Exact 1-D k-means: the native routine and its numpy fallback reach the brute-force optimum."""

import itertools

import numpy as np
import pytest

from afmkit.compress import kmeans
from afmkit.errors import UserError


@pytest.fixture(params=["native", "numpy"])
def path(request, monkeypatch):
    """Run each test through the compiled routine and through the numpy fallback."""
    if request.param == "native":
        if kmeans._library() is None:
            pytest.skip("no C++ compiler, or AFMKIT_KERNELS=0")
    else:
        monkeypatch.setattr(kmeans, "_library", lambda: None)
    return request.param


def _cost(values, weights, centroids, labels):
    return float((weights * (values - centroids[labels]) ** 2).sum())


def _brute_force(values, k, weights):
    """The least cost over every split of the sorted values into k contiguous nonempty runs
    (an optimal 1-D clustering is such a split), each run at its weighted mean."""
    order = np.argsort(values)
    x, w = values[order], weights[order]
    n = len(x)
    if len(np.unique(x)) <= k:
        return 0.0
    best = np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        total = 0.0
        for a, b in itertools.pairwise(edges):
            mean = (w[a:b] * x[a:b]).sum() / w[a:b].sum()
            total += (w[a:b] * (x[a:b] - mean) ** 2).sum()
        best = min(best, total)
    return best


def _tolerance(values, weights):
    # Costs are sums of at most n terms w * x^2 in float64, each rounded relatively by ~1e-16, and
    # the programme reads them as differences of prefix sums over the same terms: the error stays
    # below 1e-12 of the total weighted square (a clustering that is worse by less is a tie).
    return 1e-12 * float((weights * values**2).sum()) + 1e-300


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_matches_brute_force_on_small_inputs(path, weighted):
    rng = np.random.default_rng(1)
    for trial in range(150):
        n = int(rng.integers(1, 11))
        k = int(rng.integers(1, 6))
        # some trials rounded to few decimals: repeated values
        values = rng.normal(size=n).round(int(rng.integers(0, 4)))
        weights = rng.uniform(0.05, 5, size=n) if weighted else np.ones(n)
        centroids, labels = kmeans.kmeans1d_optimal(values, k, weights if weighted else None)
        assert centroids.shape == (k,) and labels.shape == (n,) and labels.min() >= 0 and labels.max() < k
        assert np.all(np.diff(centroids) >= 0), "centroids ascend"
        got, best = _cost(values, weights, centroids, labels), _brute_force(values, k, weights)
        assert got <= best + _tolerance(values, weights), (trial, values, weights, k)


def test_weights_move_centroids_to_the_heavy_values(path):
    values = np.array([0.0, 1.0, 2.0, 10.0])
    # one cluster for 0, 1, 2: its centroid is their weighted mean
    centroids, labels = kmeans.kmeans1d_optimal(values, 2, [1.0, 1.0, 1.0, 1.0])
    assert centroids[0] == pytest.approx(1.0) and list(labels) == [0, 0, 0, 1]
    centroids, _ = kmeans.kmeans1d_optimal(values, 2, [100.0, 1.0, 1.0, 1.0])
    assert centroids[0] == pytest.approx(3.0 / 102.0)


def test_each_value_goes_to_its_nearest_centroid(path):
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(size=300), rng.laplace(size=300) * 3])
    weights = rng.exponential(size=600)
    centroids, labels = kmeans.kmeans1d_optimal(values, 8, weights)
    distance = np.abs(values[:, None] - centroids[None, :])
    # an optimum never leaves a value with a strictly nearer centroid than its own
    assert np.all(distance[np.arange(600), labels] <= distance.min(axis=1) + 1e-12)
    # and every centroid is the weighted mean of its cluster
    for c in range(8):
        members = labels == c
        assert centroids[c] == pytest.approx((weights[members] * values[members]).sum() / weights[members].sum())


def test_fewer_distinct_values_than_clusters_are_kept_exactly(path):
    values = np.array([3.0, -1.0, 3.0, 0.5, -1.0])
    centroids, labels = kmeans.kmeans1d_optimal(values, 16)
    assert centroids.shape == (16,)
    np.testing.assert_array_equal(centroids[labels], values)


def test_zero_importance_still_gets_a_centroid(path):
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    centroids, labels = kmeans.kmeans1d_optimal(values, 3, [0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    assert np.all(np.isfinite(centroids))
    # the two weighted values are the whole cost: they sit on centroids of their own
    assert np.abs(centroids[labels][2:4] - values[2:4]).max() < 1e-6


def test_groups_are_clustered_independently(path):
    rng = np.random.default_rng(3)
    values = rng.normal(size=(5, 200)) * np.arange(1, 6)[:, None]
    weights = rng.uniform(0.1, 2, size=(5, 200))
    centroids, labels = kmeans.kmeans1d_groups(values, 4, weights)
    for g in range(5):
        alone_centroids, alone_labels = kmeans.kmeans1d_optimal(values[g], 4, weights[g])
        assert _cost(values[g], weights[g], centroids[g], labels[g]) == pytest.approx(
            _cost(values[g], weights[g], alone_centroids, alone_labels), rel=1e-12
        )


def test_native_and_numpy_reach_the_same_cost(monkeypatch):
    if kmeans._library() is None:
        pytest.skip("no C++ compiler, or AFMKIT_KERNELS=0")
    rng = np.random.default_rng(4)
    values = rng.standard_t(3, size=(3, 4000)).round(2)  # heavy tails and many repeats
    weights = rng.exponential(size=(3, 4000))
    native = kmeans.kmeans1d_groups(values, 16, weights)
    monkeypatch.setattr(kmeans, "_library", lambda: None)
    fallback = kmeans.kmeans1d_groups(values, 16, weights)
    for g in range(3):
        a = _cost(values[g], weights[g], native[0][g], native[1][g])
        b = _cost(values[g], weights[g], fallback[0][g], fallback[1][g])
        assert a == pytest.approx(b, rel=1e-9, abs=_tolerance(values[g], weights[g]))


def test_bad_input_is_refused_in_one_line():
    for call in (
        lambda: kmeans.kmeans1d_optimal([1.0, np.nan], 2),
        lambda: kmeans.kmeans1d_optimal([1.0, 2.0], 0),
        lambda: kmeans.kmeans1d_optimal([1.0, 2.0], 2, [1.0, -1.0]),
        lambda: kmeans.kmeans1d_optimal([1.0, 2.0], 2, [1.0]),
        lambda: kmeans.kmeans1d_optimal(np.ones((2, 2)), 2),
    ):
        with pytest.raises(UserError) as error:
            call()
        assert "\n" not in str(error.value)
