"""membership.decide on images (not score vectors): the TRUE groups of a 900 + 300 set given as
the clusters. Scores against the small cluster's maps run low by their noise; without a
correction the large cluster took images of the small one (fitted shares 0.79-0.85 against
0.75) and claimed a purity it did not have (estimated 97 %, measured 89-94 %)."""

import numpy as np
import pytest

from sort3ddepth.engine.membership import decide
from sort3ddepth.tests.sorting_data import prepared_set


@pytest.mark.parametrize("seed", [4, 6])
def test_shares_and_purity_of_a_small_cluster_next_to_a_large_one(tmp_path, seed):
    data, maps, truth = prepared_set(tmp_path, n_per_class=900, n_classes=2, snr=0.15, seed=seed)
    everyone = np.sort(np.concatenate([np.nonzero(truth == 0)[0], np.nonzero(truth == 1)[0][:300]]))
    t = truth[everyone]
    groups = [everyone[t == j] for j in (0, 1)]
    _, memb, _ = decide(
        maps,
        data,
        everyone,
        groups,
        open_rows=np.ones(len(everyone), bool),
        pool_joins=True,
        min_purity=0.97,
        min_size=1,
    )
    share = memb.posterior.mean(axis=0)
    assert abs(share[1] - 0.25) <= 0.02, share
    for j in (0, 1):
        members = t[memb.labels == j]
        assert members.size >= 100
        measured = np.mean(members == j)
        error = abs(memb.estimated_purity[j] - measured)
        assert error <= 0.03, (j, memb.estimated_purity, measured)


def test_held_out_gain_of_a_split_tells_two_states_from_one(tmp_path):
    """membership.split_gain, the split check's judge between starts: the TRUE split of 900 +
    300 images of two states (SNR 0.3) gains over the union's map by many standard errors; a
    random split of them gains nothing; and any split of ONE state (random, or along its views)
    loses against the union's map, whose noise is lower and which fits every view as well."""
    from sort3ddepth.engine.membership import split_gain

    data, maps, truth = prepared_set(tmp_path, n_per_class=900, n_classes=2, snr=0.3, seed=4)
    blend = np.sort(np.concatenate([np.nonzero(truth == 0)[0], np.nonzero(truth == 1)[0][:300]]))
    gain, se = split_gain(maps, data, blend, (truth[blend] == 1).astype(np.int64), k=2)
    assert gain > 5 * se > 0, (gain, se)
    rng = np.random.default_rng(1)
    noise, _ = split_gain(maps, data, blend, rng.integers(0, 2, len(blend)), k=2)
    assert noise < 0.2 * gain, (noise, gain)
    one = np.nonzero(truth == 0)[0]
    tilt = np.abs(data.views[one, 2])  # |cos| of each image's tilt
    for labels in (rng.integers(0, 2, len(one)), (tilt > np.median(tilt)).astype(np.int64)):
        loss, se = split_gain(maps, data, one, labels, k=2)
        assert loss <= se, (loss, se)
