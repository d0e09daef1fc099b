"""Score fusion against hand computations."""

import pytest

from raysys.search.fusion import interpolate, minmax, rrf, weighted_sum


def test_minmax_and_ties():
    assert minmax({"a": 2.0, "b": 4.0, "c": 3.0}) == {"a": 0.0, "b": 1.0, "c": 0.5}
    assert minmax({"a": 1.0, "b": 1.0}) == {"a": 0.0, "b": 0.0}
    assert minmax({}) == {}


def test_interpolate_is_the_rerank_mix():
    a = {"x": 10.0, "y": 0.0, "z": 5.0}
    b = {"x": 0.0, "y": 1.0, "z": 0.5, "w": 9.0}  # w is outside a: ignored
    got = interpolate(a, b, 0.25)
    assert got == pytest.approx({"x": 0.25, "y": 0.75, "z": 0.5})
    with pytest.raises(ValueError, match="no second score"):
        interpolate({"q": 1.0}, {}, 0.5)


def test_weighted_sum_normalises_and_fills_missing_with_zero():
    r1 = {"q": {"a": 3.0, "b": 1.0}}
    r2 = {"q": {"b": 10.0, "c": 0.0}}
    got = weighted_sum([r1, r2], [1.0, 0.5])
    assert got == {"q": pytest.approx({"a": 1.0, "b": 0.5, "c": 0.0})}
    raw = weighted_sum([r1, r2], normalize=False)
    assert raw == {"q": {"a": 3.0, "b": 11.0, "c": 0.0}}
    with pytest.raises(ValueError, match="2 runs but 1 weights"):
        weighted_sum([r1, r2], [1.0])


def test_rrf_by_hand():
    r1 = {"q": {"a": 0.9, "b": 0.5, "c": 0.1}}
    r2 = {"q": {"c": 7.0, "a": 3.0}}
    got = rrf([r1, r2], k=60)["q"]
    assert got["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert got["b"] == pytest.approx(1 / 62)
    assert got["c"] == pytest.approx(1 / 63 + 1 / 61)
    # Equal scores rank by doc id, so fusion is deterministic.
    tied = rrf([{"q": {"z": 1.0, "m": 1.0}}], k=0)["q"]
    assert tied == {"m": 1.0, "z": 0.5}
