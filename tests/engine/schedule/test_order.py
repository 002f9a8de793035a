import pytest

from hiftune.engine.schedule.order import group_order


def test_fixed_orders():
    assert group_order(4, "bottom2up") == [0, 1, 2, 3]
    assert group_order(4, "top2down") == [3, 2, 1, 0]


def test_random_is_a_seeded_permutation():
    a = group_order(20, "random", seed=3)
    assert sorted(a) == list(range(20))
    assert a == group_order(20, "random", seed=3)
    assert a != group_order(20, "random", seed=4)
    assert a != list(range(20))


def test_bad_input():
    with pytest.raises(ValueError, match="order must be one of"):
        group_order(3, "zigzag")
    with pytest.raises(ValueError, match="num_groups"):
        group_order(0, "bottom2up")
