import pytest
from scipy.stats import binomtest

from mmgen.eval.paired import compare, sign_test


@pytest.mark.parametrize("a_only,b_only", [(80, 55), (55, 80), (10, 0), (3, 4), (0, 1), (200, 170)])
def test_sign_test_is_the_exact_two_sided_binomial_test(a_only, b_only):
    want = binomtest(a_only, a_only + b_only, 0.5, alternative="two-sided").pvalue
    assert sign_test(a_only, b_only) == pytest.approx(want, rel=1e-9)


def test_sign_test_edges():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 5) == 1.0
    with pytest.raises(ValueError):
        sign_test(-1, 3)


def test_compare_counts_discordant_scenes_overall_and_by_group():
    a = [True, True, False, False, True, False]
    b = [True, False, True, False, False, False]
    out = compare(a, b, groups=[1, 1, 2, 2, 3, 3])
    assert (out["n"], out["a_right"], out["b_right"], out["a_only"], out["b_only"]) == (6, 3, 2, 2, 1)
    assert out["p_sign"] == 1.0
    assert out["by_group"]["1"] == {"n": 2, "a_right": 2, "b_right": 1, "a_only": 1, "b_only": 0, "p_sign": 1.0}
    assert out["by_group"]["2"]["b_only"] == 1 and out["by_group"]["3"]["a_only"] == 1


def test_compare_refuses_unpaired_verdicts():
    with pytest.raises(ValueError, match="same scenes"):
        compare([True], [True, False])
    with pytest.raises(ValueError, match="group keys"):
        compare([True], [False], groups=[1, 2])
