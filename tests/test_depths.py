import math

import pytest

from evalctx.errors import UsageError
from evalctx.tasks.depths import depth_grid, sigmoid_depths


def gkamradt_reference(n: int) -> list[float]:
    """LLMTest_NeedleInAHaystack: [logistic(x) for x in np.linspace(0, 100, n)], in percent."""

    def logistic(x: float, L: float = 100, x0: float = 50, k: float = 0.1) -> float:
        if x in [0, 100]:
            return x
        x = -k * (x - x0)
        return round(L * (1 / (1 + math.exp(x))), 3)

    xs = [0.0] if n == 1 else [100 * i / (n - 1) for i in range(n)]
    return [logistic(x) for x in xs]


def test_explicit_fractions_pass_through():
    assert depth_grid([0, 0.25, 0.5, 1]) == [0.0, 0.25, 0.5, 1.0]
    assert depth_grid((1.0,)) == [1.0]


@pytest.mark.parametrize("bad", [[50], [0, 1.5], [100]])
def test_percent_is_rejected_with_a_hint(bad):
    with pytest.raises(UsageError, match="fractions 0..1, not percent"):
        depth_grid(bad)


@pytest.mark.parametrize("bad", [[-0.1], ["half"], [True], [float("nan")], []])
def test_bad_values_are_rejected(bad):
    with pytest.raises(UsageError):
        depth_grid(bad)


def test_linear():
    assert depth_grid({"linear": 5}) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert depth_grid({"linear": 2}) == [0.0, 1.0]
    assert depth_grid({"linear": 1}) == [0.0]
    assert len(depth_grid({"linear": 35})) == 35


@pytest.mark.parametrize("n", [2, 5, 10, 35])
def test_sigmoid_matches_gkamradt(n):
    got = depth_grid({"sigmoid": n})
    want = [p / 100 for p in gkamradt_reference(n)]
    assert got == pytest.approx(want, abs=1e-9)
    assert got[0] == 0.0 and got[-1] == 1.0
    assert got == sorted(got)
    assert sigmoid_depths(n) == got


def test_sigmoid_is_dense_at_the_ends():
    d = depth_grid({"sigmoid": 11})
    assert d[1] - d[0] < d[6] - d[5] and d[-1] - d[-2] < d[6] - d[5]  # small steps near 0 and 1
    assert all(0 <= x <= 1 for x in d)


@pytest.mark.parametrize("spec", [{"linear": 0}, {"sigmoid": -1}, {"linear": 2.5}, {"linear": True},
                                  {"log": 5}, {"linear": 3, "sigmoid": 3}, {}, "0.5", 0.5, None])
def test_bad_specs(spec):
    with pytest.raises(UsageError):
        depth_grid(spec)
