"""R and Q of sga.attacks.scores on values computed by hand."""
import math

import pytest

from sga.attacks.scores import SCORE_EPS, change_score, relearn_score


@pytest.mark.parametrize("d_unl, d_ret, expected", [
    (0.2, 0.2, 1.0),                      # the same change as the retain model's: fully robust
    (0.3, 0.1, 1.0 - 0.2 / 0.4),          # |0.3 - 0.1| / (0.3 + 0.1) = 0.5
    (0.5, 0.0, 0.0),                      # comes back while the retain model learns nothing
    (0.1, -0.1, 0.0),                     # opposite directions: |0.2| / 0.2 = 1
    (-0.04, -0.01, 1.0 - 0.03 / 0.05),    # 0.4
    (0.0, 0.0, 1.0),                      # nothing moved: 0 / eps = 0
])
def test_relearn_score_by_hand(d_unl, d_ret, expected):
    assert relearn_score(d_unl, d_ret) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("before, after, expected", [
    (0.4, 0.4, 1.0),
    (0.1, 0.3, 1.0 - 0.2 / 0.4),          # 0.5
    (0.0, 0.25, 0.0),                     # from nothing: |0.25| / 0.25
    (0.8, 0.2, 1.0 - 0.6 / 1.0),          # 0.4
    (-1.0, 1.0, 0.0),                     # a sign flip (privleak-like metrics)
    (0.0, 0.0, 1.0),
])
def test_change_score_by_hand(before, after, expected):
    assert change_score(before, after) == pytest.approx(expected, abs=1e-8)


def test_scores_stay_in_unit_interval_and_symmetric():
    for a, b in [(0.3, 0.7), (1e-12, 0.0), (-2.0, 5.0), (123.0, 0.001)]:
        for score in (relearn_score(a, b), change_score(a, b)):
            assert 0.0 <= score <= 1.0
        assert relearn_score(a, b) == relearn_score(b, a) and change_score(a, b) == change_score(b, a)


def test_eps_only_guards_zero():
    # a change far above eps is unaffected by it; a change of the order of eps is damped
    assert relearn_score(1e-3, 0.0) == pytest.approx(1.0 - 1e-3 / (1e-3 + SCORE_EPS))
    assert relearn_score(SCORE_EPS, 0.0) == pytest.approx(0.5)


def test_missing_metric_has_no_score_and_non_finite_is_an_error():
    assert relearn_score(None, 0.1) is None and change_score(0.2, None) is None
    with pytest.raises(ValueError, match="finite"):
        change_score(math.nan, 0.1)
    with pytest.raises(ValueError, match="finite"):
        relearn_score(0.1, math.inf)
