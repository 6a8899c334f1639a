"""The sorting driver (sorter.py): the generation loop on stored partitions
(no sorting needed), and one small run end to end whose summary.json is read through the
schema."""

import json
import types

import numpy as np
import pytest

from sort3ddepth.engine import cli, sorter
from sort3ddepth.engine.depth import Partition, policy_of
from sort3ddepth.engine.parallel import Comm
from sort3ddepth.engine.results import SCHEMA_VERSION, read_summary
from sort3ddepth.tests.sorting_data import make_star


class StoredGenerations:
    """Checkpoints that hold every generation's partition: the loop runs without sorting."""

    def __init__(self, partitions):
        self.partitions = partitions
        self.loaded = []

    def load(self, key, rng):
        self.loaded.append(key)
        return {"partition": self.partitions[key]}


def _ctx():
    # search=False: the split check (search mode only) is tested in test_depth_split.py
    return types.SimpleNamespace(rng=np.random.default_rng(0), log=lambda *a: None, search=False)


def _part(clusters, stats=()):
    clusters = [np.asarray(c, np.int64) for c in clusters]
    return Partition(clusters, np.zeros(0, np.int64), 0.5, list(stats))


def test_post_filter_drops_only_tiny_clusters_by_their_reproduced_size():
    """A cluster not more than a tenth of the largest (as reproduced) goes back to the pool; a
    minority of 60 next to 400 stays (SPHIRE's third of the largest dropped it), and so does one
    the member check shrank but that was reproduced large enough."""
    subset = np.arange(1000)
    stored = StoredGenerations(
        {
            "gen000": _part(
                [range(0, 400), range(400, 430), range(430, 490), range(490, 520)],
                [{"jaccard": 90.0}, {"reproduced_size": 200}, {"jaccard": 70.0}, {}],
            )
        }
    )
    run = sorter._one_generation(_ctx(), 0, subset, 3, earlier=[], comm=Comm(), checkpoints=stored)
    assert [len(c) for c in run.clusters] == [400, 30, 60]
    assert run.stats == [{"jaccard": 90.0}, {"reproduced_size": 200}, {"jaccard": 70.0}]
    np.testing.assert_array_equal(run.unaccounted, np.arange(490, 1000))
    assert (run.generation, run.n_images) == (0, 1000)


def test_nothing_reproduced_is_one_homogeneous_cluster():
    stored = StoredGenerations({"gen000": _part([])})
    run = sorter._one_generation(
        _ctx(), 0, np.arange(300), 3, earlier=[], comm=Comm(), checkpoints=stored
    )
    assert [len(c) for c in run.clusters] == [300] and run.stats == [{}]
    assert len(run.unaccounted) == 0


def test_after_the_member_check_the_split_check_sees_only_grown_clusters(monkeypatch):
    """Every group was split-checked as reproduced (before the member check); afterwards only a
    cluster the member check grew with pool images is checked again (it holds images no check
    has seen: a-k4-uneq-3500-snr05's 3,858 reproduced images of one state became 5,260 of
    three) with at least as many new images as the smallest cluster (fewer cannot be a part
    of their own: bench_sort's clusters took in 6-16 each, and their checks took 27 of 288 s),
    and the whole set when nothing reproduced."""
    seen = []

    def record(ctx, clusters, stats, *, tag="", only=None):
        seen.append(list(only))
        return clusters, stats, np.zeros(0, np.int64)

    monkeypatch.setattr(sorter, "split_check", record)
    ctx = _ctx()
    ctx.search = True
    least = policy_of(ctx).min_cluster_size
    grown = [{"reproduced_size": n} for n in (300, 250, 100, 61 - least, 60 - least)]
    clusters = [range(0, 400), range(400, 600), range(600, 700), range(700, 760), range(760, 820)]
    stored = StoredGenerations({"gen000": _part(clusters, grown)})
    sorter._one_generation(ctx, 0, np.arange(900), 3, earlier=[], comm=Comm(), checkpoints=stored)
    stored = StoredGenerations({"gen000": _part([])})
    sorter._one_generation(ctx, 0, np.arange(300), 3, earlier=[], comm=Comm(), checkpoints=stored)
    assert seen == [[True, False, False, False, True], [True]]


def test_generations_follow_the_pool_until_too_few_are_left():
    """Generation 1 sorts what generation 0 left; it stops when K = pool / group size < 2."""
    stored = StoredGenerations(
        {
            "gen000": _part([range(0, 300), range(300, 600)]),
            "gen001": _part([range(600, 850)]),
        }
    )
    found = sorter.run_generations(_ctx(), n=1000, k0=3, work=200, comm=Comm(), checkpoints=stored)
    assert stored.loaded == ["gen000", "gen001"]
    assert [len(c) for c in found.clusters] == [300, 300, 250]
    assert found.gen_of == [0, 0, 1] and found.final_id == [0, 1, 2]
    np.testing.assert_array_equal(found.unaccounted, np.arange(850, 1000))
    assert [g.n_images for g in found.generations] == [1000, 400]


@pytest.mark.parametrize(
    "search, init_k, joins",
    [(False, 3, True), (False, 4, False), (True, 3, False), (True, 7, False)],
)
def test_the_pool_joins_when_no_group_can_be_missing(monkeypatch, search, init_k, joins):
    """After the last generation found groups, the unaccounted images may be a state no
    cluster stands for: they may join the clusters at the final assignment only when the user
    gave K and all K groups were found (3 here), never in search mode."""
    stored = StoredGenerations(
        {"gen000": _part([range(0, 300), range(300, 600)]), "gen001": _part([range(600, 850)])}
    )
    ctx = _ctx()
    found = sorter.run_generations(ctx, n=1000, k0=3, work=200, comm=Comm(), checkpoints=stored)
    seen = {}

    def final_assignment(ctx, clusters, pool, pool_searched=False):
        seen["joins"] = pool_searched
        raise StopIteration

    monkeypatch.setattr(sorter, "final_assignment", final_assignment)
    ctx.search, ctx.init_k = search, init_k
    with pytest.raises(StopIteration):
        sorter.assign_final(ctx, found)
    assert seen["joins"] is joins


def test_a_state_found_again_is_merged_and_assigned_again(monkeypatch):
    """The final assignment runs again after found_again (depth/split.py) names a pair: the
    later cluster joins the earlier one, the generations' clusters follow (final_id), and a
    pair is never checked twice (the set of pairs tried is the same across the rounds)."""
    from sort3ddepth.engine.membership import Membership

    stored = StoredGenerations(
        {
            "gen000": _part([range(0, 300), range(300, 600)], [{"jaccard": 90.0}, {}]),
            "gen001": _part([range(600, 700), range(700, 760)], [{}, {"jaccard": 70.0}]),
        }
    )
    ctx = _ctx()
    found = sorter.run_generations(ctx, n=1000, k0=3, work=200, comm=Comm(), checkpoints=stored)
    ctx.search, ctx.init_k = True, 7
    rounds, tries = [], []

    def final_assignment(ctx, clusters, pool, pool_searched=False):
        rounds.append([len(c) for c in clusters])
        m, n = len(clusters), 1000
        return (
            list(clusters),
            pool,
            Membership(np.ones((n, m)) / m, np.zeros(n, int), np.ones(m), np.zeros(m, bool)),
        )

    def found_again(ctx, clusters, memb, everyone, *, tried):
        tries.append(id(tried))
        return (3, 0) if len(clusters) == 4 else None

    monkeypatch.setattr(sorter, "final_assignment", final_assignment)
    monkeypatch.setattr(sorter, "found_again", found_again)
    out = sorter.assign_final(ctx, found)
    assert rounds == [[300, 300, 100, 60], [360, 300, 100]]
    assert len(set(tries)) == 1
    assert out.final_id == [0, 1, 2, 0]
    assert out.gen_of == [0, 0, 1]
    assert out.stats[0]["jaccard"] == 90.0


@pytest.mark.slow
def test_small_run_writes_its_summary_through_the_schema(tmp_path):
    """One process on 3 x 150 particles, --not_include_unaccounted: summary.json carries
    schema_version, reads back into the same dict, and agrees with the cluster files; the images
    in no cluster are in Core_set.txt only (no trash-bin cluster file)."""
    star, _ = make_star(tmp_path, n_per_class=150, n_classes=3, box=32, snr=3.0)
    out = tmp_path / "out"
    code = cli.run(
        [
            "--instack",
            str(star),
            "--output_dir",
            str(out),
            "--img_per_grp",
            "150",
            "--seed",
            "3",
            "--depth_order",
            "1",
            "--not_include_unaccounted",
        ]
    )
    assert code == 0
    s = read_summary(out / "summary.json")
    assert s.schema_version == SCHEMA_VERSION
    assert s.to_dict() == json.loads((out / "summary.json").read_text())
    assert s.mode == "freeze" and s.seed == 3 and s.n_particles == 450
    assert s.pose_sigma_deg == 0.0  # the given poses alone (no --pose_sigma_deg)
    assert 0.0 <= s.pose_seconds <= s.wall_seconds  # what checking the poses cost
    assert "given poses checked in" in (out / "log.txt").read_text()
    assert s.half_sets == "random"  # the simulated STAR has no rlnRandomSubset
    core = (out / "Core_set.txt").read_text().split()
    assert len(core) > 0 and sum(c.size for c in s.clusters) + len(core) == 450
    assert len(s.regular) >= 2 and not any(c.unaccounted for c in s.clusters)
    assert not (out / f"Cluster_{len(s.clusters):03d}.txt").exists()
    for c in s.clusters:
        assert len((out / c.file).read_text().split()) == c.size
    assert s.purity_curve is not None and len(s.purity_curve.accounted) > 0
    assert all(c.estimated_purity is not None for c in s.regular)


@pytest.mark.slow
def test_pose_neighbourhood_leaves_the_orientations_as_given(tmp_path):
    """--pose_sigma_deg scores each image over turned poses but changes no stored orientation:
    all_particles.star and every Cluster_###.star keep the input's angles and origins to the
    digit; the log and summary.json say which turn was used."""
    from sort3ddepth.engine.star_io import read_star

    star, _ = make_star(tmp_path, n_per_class=150, n_classes=3, box=32, snr=3.0, pose_error=3.0)
    out = tmp_path / "out"
    argv = ["--instack", str(star), "--output_dir", str(out), "--img_per_grp", "150"]
    assert cli.run(argv + ["--seed", "3", "--depth_order", "1", "--pose_sigma_deg", "2"]) == 0
    assert read_summary(out / "summary.json").pose_sigma_deg == 2.0
    assert "neighbours turned 2 deg, weighed by their likelihood" in (out / "log.txt").read_text()
    given = read_star(star)
    written = read_star(out / "all_particles.star")
    np.testing.assert_array_equal(written.angles, given.angles)
    np.testing.assert_array_equal(written.shifts, given.shifts)
    for f in sorted(out.glob("Cluster_*.star")):
        part = read_star(f)
        rows = np.loadtxt(f.with_suffix(".txt"), dtype=np.int64, ndmin=1)
        np.testing.assert_array_equal(part.angles, given.angles[rows])


def test_the_input_half_sets_are_the_sorting_halves(tmp_path):
    """Poses from a gold-standard refinement were fitted to their half's map, noise included,
    so every map an image is scored against comes from the other of the REFINEMENT's halves
    (rlnRandomSubset); random halves only where the input has none or one half holds under
    INPUT_HALVES_MIN_SHARE of the images."""
    from sort3ddepth.engine.options import SortOptions
    from sort3ddepth.engine.preprocess import INPUT_HALVES_MIN_SHARE, prepare, sorting_halves
    from sort3ddepth.engine.star_io import read_star

    star, _ = make_star(tmp_path, n_per_class=100, n_classes=2, box=32)
    particles = read_star(star)
    given = np.random.default_rng(1).permutation(np.arange(200) % 2)
    particles.half_set = given
    opts = SortOptions.from_argv(["--instack", str(star), "--output_dir", str(tmp_path)])
    lines = []
    data = prepare(
        particles,
        Comm(),
        opts.for_input(n_particles=200),
        np.random.default_rng(0),
        log=lines.append,
    )
    np.testing.assert_array_equal(data.half, given)
    assert any("half sets: the input's own (rlnRandomSubset: 100 / 100 images)" in x for x in lines)

    drawn = np.random.default_rng(5).integers(0, 2, 200)
    particles.half_set = (np.arange(200) < 0.9 * INPUT_HALVES_MIN_SHARE * 200).astype(np.int64)
    np.testing.assert_array_equal(sorting_halves(particles, np.random.default_rng(5)), drawn)
    particles.half_set = None
    np.testing.assert_array_equal(sorting_halves(particles, np.random.default_rng(5)), drawn)


@pytest.mark.parametrize(
    "search, second_cluster, searched",
    [
        (True, range(600, 780), True),
        (True, range(600, 830), False),
        (False, range(600, 780), False),
    ],
)
def test_a_pool_that_could_hold_a_group_is_searched_at_k_2(
    monkeypatch, search, second_cluster, searched
):
    """Search mode: a pool that the final assignment would keep out of the clusters (as many
    images as the smallest cluster) is searched for its group at K = 2 even where K = pool /
    group size rounds to 1; a smaller pool is not (it joins the clusters), nor is any pool
    when the user gave K (SPHIRE's rule: K < 2 ends the generations)."""
    monkeypatch.setattr(sorter, "split_check", lambda ctx, c, s, **kw: (c, s, np.zeros(0, int)))
    stored = StoredGenerations(
        {
            "gen000": _part([range(0, 300), range(300, 600)]),
            "gen001": _part([second_cluster]),
            "gen002": _part([]),
        }
    )
    ctx, logs = _ctx(), []
    ctx.search, ctx.log = search, logs.append
    found = sorter.run_generations(ctx, n=1000, k0=3, work=200, comm=Comm(), checkpoints=stored)
    assert stored.loaded == ["gen000", "gen001"] + (["gen002"] if searched else [])
    if searched:  # 220 images, 220 / 200 rounds to 1; the smallest cluster holds 180
        assert "generation 2: 220 images, K = 2" in logs
        assert sorter._no_group_missing(ctx, found)  # nothing there: the pool may join
