"""depth.box: when a box's run stops iterating."""

from types import SimpleNamespace

from sort3ddepth.engine.depth.box import _converged
from sort3ddepth.engine.depth.policy import POLICY


def _stops(*, search=True, learned=True, started=False, kept=6, repro=99.9, it=0):
    ctx = SimpleNamespace(search=search, frozen=False, policy=POLICY)
    run = SimpleNamespace(
        it=it,
        run=0,
        k=6,
        started=started,
        allow_k_reset=not learned,
        accepted=[[0]] * kept,
        prev_repro=None,
    )
    res = SimpleNamespace(reproducibility=repro)
    return _converged(ctx, run, res, ri=0.5, niters=[9, 9])


def test_a_box_with_a_settled_k_that_keeps_every_group_stops_at_once():
    """Search mode: a layer-0 box given the K that an earlier box validated (box learning),
    or started from a previous layer's groups, stops after its first iteration when it kept
    every group reproducibly (on bench_sort another iteration only dropped, by SPHIRE's size
    tests, a small group that the comparison between boxes drops anyway, and a probe then
    rebuilt nothing)."""
    assert _stops()
    assert _stops(learned=False, started=True)


def test_a_box_that_explores_k_or_missed_a_group_iterates_again():
    assert not _stops(learned=False)  # the box that finds K
    assert not _stops(kept=5)  # a group missing: the probe rebuilds it
    assert not _stops(repro=80.0)  # not reproducible enough yet
    assert not _stops(search=False)  # K given: SPHIRE's iterations and size tests
