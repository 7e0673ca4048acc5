import pytest

from dschat_cli.config.schema import ConfigError
from dschat_cli.data.split import carve_indices, phase_indices, split_boundaries


def test_boundaries_follow_cumulative_fractions():
    # 2,4,4 of 10 -> cumulative 0.2, 0.6, 1.0 -> 2, 6, 10
    assert split_boundaries(10, (2, 4, 4)) == [0, 2, 6, 10]
    # of 7: 1.4 -> 1, 4.2 -> 4, 7
    assert split_boundaries(7, (2, 4, 4)) == [0, 1, 4, 7]
    # zero-size parts stay empty whatever n
    for n in range(0, 30):
        b = split_boundaries(n, (10, 0, 0))
        assert b == [0, n, n, n]


@pytest.mark.parametrize("n", [1, 3, 10, 97, 1000])
def test_phases_disjoint_and_cover(n):
    parts = [phase_indices(n, "2,4,4", p, seed=1234, allow_empty=True) for p in (1, 2, 3)]
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))  # cover, and no index twice (disjoint)


def test_deterministic_and_seeded():
    a = phase_indices(100, "2,4,4", 2, seed=7)
    assert a == phase_indices(100, (2, 4, 4), 2, seed=7)
    assert a != phase_indices(100, "2,4,4", 2, seed=8)


def test_proportions():
    sizes = [len(phase_indices(1000, "2,4,4", p, seed=0)) for p in (1, 2, 3)]
    assert sizes == [200, 400, 400]
    sizes = [len(phase_indices(1000, "1,1,1", p, seed=0)) for p in (1, 2, 3)]
    assert sizes == [333, 334, 333]


def test_matches_reference_permutation():
    # The reference: RandomState(seed).shuffle(arange(n)), then slices.
    import numpy as np

    idx = np.arange(50, dtype=np.uint32)
    np.random.RandomState(1234).shuffle(idx)
    assert phase_indices(50, "2,4,4", 1, seed=1234) == idx[:10].tolist()
    assert phase_indices(50, "2,4,4", 3, seed=1234) == idx[30:].tolist()


def test_empty_phase_raises_with_flag():
    with pytest.raises(ConfigError) as e:
        phase_indices(2, "2,4,4", 1, seed=1, source="my.json")
    assert e.value.where == "--data-split"
    assert "'2,4,4' leaves step 1 no rows of my.json (2 rows)" in e.value.message
    with pytest.raises(ConfigError) as e:
        phase_indices(100, "10,0,0", 2, seed=1)
    assert e.value.where == "--data-split" and "positive share" in e.value.message
    assert phase_indices(100, "10,0,0", 2, seed=1, allow_empty=True) == []


def test_carve_eval_is_seeded_9_to_1():
    tr, ev = carve_indices(100, seed=3)
    assert len(tr) == 90 and len(ev) == 10 and sorted(tr + ev) == list(range(100))
    assert (tr, ev) == carve_indices(100, seed=3)
    tr, ev = carve_indices(3, seed=3)  # tiny: still one eval row
    assert len(ev) == 1 and len(tr) == 2
