"""SortOptions (one frozen object per run) and validate (every problem, one line each)."""

import dataclasses

import pytest

from sort3ddepth.engine.options import (
    DEFAULT_MIN_PURITY,
    INIT_K_STACK,
    DataSummary,
    SortOptions,
    build_parser,
    validate,
)


def test_options_are_frozen_and_derived_once():
    o = SortOptions.from_argv(["--instack", "p.star", "--img_per_grp", "100"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.radius = 3
    assert o.k_initial is None and o.meridien is None
    d = o.for_input(n_particles=1000)
    assert (d.n_particles, d.k_initial, o.k_initial) == (1000, 10, None)
    assert d.group_sizes(1000) == (False, 10, 100)
    assert (d.search, d.frozen, d.mode) == (False, True, "freeze")
    s = SortOptions.from_argv(["--instack", "p.star"]).for_input(n_particles=700)
    assert (s.search, s.k_initial, s.mode) == (True, INIT_K_STACK, "search")
    assert s.group_sizes(700) == (True, 7, 100)
    general = SortOptions(img_per_grp=100, not_freeze_groups=True)
    assert general.mode == "general"


def test_reversed_questions():
    o = SortOptions.from_argv(["--not_include_unaccounted", "--notapplybckgnoise"])
    assert (o.include_unaccounted, o.apply_noise) == (False, False)
    o = SortOptions()
    assert (o.include_unaccounted, o.apply_noise) == (True, True)


def test_argv_round_trip_and_record():
    argv = [
        "--instack",
        "p.star",
        "--radius",
        "20",
        "--use_umat",
        "--seed",
        "4",
        "--min_purity",
        "0.9",
    ]
    o = SortOptions.from_argv(argv)
    assert SortOptions.from_argv(o.to_argv()) == o
    assert sorted(o.to_argv()) == sorted(argv)
    # named options come out in the order given, defaults included, False flags left out
    assert o.to_argv(["radius", "sym", "not_freeze_groups", "focus"]) == [
        "--radius",
        "20",
        "--sym",
        "c1",
    ]
    rec = o.record()
    assert "seed" not in rec and "output_dir" not in rec and "force" not in rec
    assert rec["instack"].endswith("/p.star") and rec["instack"].startswith("/")


def test_parser_from_the_fields():
    """Every option field is a command-line option with its default; units in the help."""
    p = build_parser()
    ns = p.parse_args([])
    for f in SortOptions.option_fields():
        assert getattr(ns, f.name) == f.default, f.name
    text = p.format_help()
    assert "[px]" in text and "[GB]" in text
    assert DEFAULT_MIN_PURITY == pytest.approx(0.98)
    assert not any(
        f.name in vars(ns) for f in dataclasses.fields(SortOptions) if "derived" in f.metadata
    )


def test_default_purity_is_the_engines():
    from sort3ddepth.engine.membership import DEFAULT_MIN_PURITY as engine_default

    assert DEFAULT_MIN_PURITY == engine_default


def test_every_problem_one_line_naming_its_option():
    o = SortOptions(
        instack="p.star",
        sym="x5",
        depth_order=0,
        nstep=0,
        overhead=-1,
        orientation_groups=0,
        min_purity=0.3,
        img_per_grp=1,
    )
    problems = validate(o)
    assert [p.split()[0] for p in problems] == [
        "--sym",
        "--depth_order",
        "--nstep",
        "--orientation_groups",
        "--overhead",
        "--min_purity",
        "--img_per_grp",
    ]
    assert all("\n" not in p for p in problems)
    assert "--overhead -1: must be at least 0 GB" in problems
    assert "--min_purity 0.3: must be between 0.5 and 1" in problems
    assert validate(SortOptions(instack="p.star")) == []


def test_input_problems(tmp_path):
    assert validate(SortOptions())[0].startswith("give --instack (stack mode) or --refinement_dir")
    missing = tmp_path / "none"
    assert validate(SortOptions(refinement_dir=str(missing))) == [
        f"--refinement_dir {missing}: meridien refinement folder does not exist"
    ]
    assert validate(SortOptions(), check_input=False) == []
    o = SortOptions(refinement_dir=str(tmp_path), niter_for_sorting=0, nsmear=1.5)
    assert validate(o) == [
        "--niter_for_sorting 0: must be -1 (the best iteration) or >= 1",
        "--nsmear 1.5: must be -1 (all smears) or a whole number >= 1",
    ]


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"img_per_grp": 100}, "--img_per_grp 100: larger than the number of particles (60)"),
        (
            {"img_per_grp": 40},
            "--img_per_grp 40: gives 1 group for 60 particles; need at least 2 "
            "(use at most 30, or -1 for search mode)",
        ),
        ({"img_per_grp": 2}, "--img_per_grp 2: too small, 30 groups for 60 particles (at most 29)"),
        (
            {"radius": 16},
            "--radius 16: must be smaller than half the box (32 px images: at most 15)",
        ),
        ({"nxinit": 40}, "--nxinit 40: larger than the image size 32"),
    ],
)
def test_problems_against_the_data(changes, expected):
    o = SortOptions(instack="p.star", **changes)
    assert validate(o) == []  # nothing to say without the data
    assert validate(o, DataSummary(60, 32)) == [expected]


def test_one_particle_and_labels():
    o = SortOptions(instack="p.star", radius=40)
    labels = {"radius": "Particle radius", "instack": "Input"}
    problems = validate(o, DataSummary(1, 32), name=lambda k: labels.get(k, k))
    assert problems == [
        "Input p.star: 1 particle(s); need more",
        "Particle radius 40: must be smaller than half the box (32 px images: at most 15)",
    ]
