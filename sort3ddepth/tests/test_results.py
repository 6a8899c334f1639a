"""The results schema (summary.json): round trip, older summaries, and one-line errors."""

import json

import pytest

from sort3ddepth.engine.results import (
    SCHEMA_VERSION,
    Cluster,
    Summary,
    SummaryError,
    read_summary,
)


def _engine_summary():
    """A summary as the engine writes it (two clusters, the unaccounted set, a purity curve)."""
    stats = {"jaccard": 91.5, "random_mean": 30.1, "random_std": 2.0, "reproduced_size": 120}
    return {
        "schema_version": SCHEMA_VERSION,
        "n_particles": 300,
        "box": 32,
        "pixel_size": 4.0,
        "sorting_size": 24,
        "seed": 5,
        "mode": "freeze",
        "generations": [
            {
                "generation": 0,
                "n_images": 300,
                "cluster_sizes": [120, 100],
                "clusters": [
                    {
                        "file": "generation_000/Cluster_000.txt",
                        "size": 120,
                        "final_id": 0,
                        **stats,
                        "map": "generation_000/vol_cluster000.mrc",
                    },
                    {
                        "file": "generation_000/Cluster_001.txt",
                        "size": 100,
                        "final_id": None,
                        **stats,
                    },
                ],
                "n_unaccounted": 80,
                "core_set": "generation_000/Core_set.txt",
                "stats": [stats, stats],
                "anova": {},
                "seconds": 12.5,
            }
        ],
        "clusters": [
            {
                "id": 0,
                "file": "Cluster_000.txt",
                "map": "vol_cluster000.mrc",
                "size": 130,
                "generation": 0,
                "unaccounted": False,
                "resolution_A": 12.3,
                "fsc": [1.0, 0.5],
                **stats,
                "estimated_purity": 0.99,
                "future_key": [1, 2],
            },
            {"id": 1, "file": "Cluster_001.txt", "size": 170, "generation": 0, "unaccounted": True},
        ],
        "anova": {"defocus": {"F": 1.0, "p": 0.3, "reason": None, "groups": [], "pairs": []}},
        "wall_seconds": 40.0,
        "input": "stack",
        "min_purity": 0.98,
        "pose_sigma_deg": 2.0,
        "cluster_file_ids": "0-based particle indices (input STAR row order)",
        "all_particles": "all_particles.star",
        "posteriors": "posteriors.npy",
        "purity_curve": {
            "threshold": [0.0, 1.0],
            "accounted": [1.0, 0.0],
            "estimated_purity": [0.9, None],
        },
    }


def test_round_trip_keeps_every_field():
    d = _engine_summary()
    s = Summary.from_dict(json.loads(json.dumps(d)))
    assert s.to_dict() == d
    assert list(s.to_dict()) == list(d)  # the engine's key order
    assert s.clusters[0].extra == {"future_key": [1, 2]}
    assert (s.clusters[0].estimated_purity, s.min_purity) == (0.99, 0.98)
    assert s.pose_sigma_deg == 2.0
    assert s.purity_curve.estimated_purity == [0.9, None]
    assert [c.label for c in s.clusters] == ["Cluster_000", "unaccounted"]
    assert [c.id for c in s.regular] == [0] and s.unaccounted.size == 170
    assert s.generation_final_ids(0) == [0, None]


def test_optional_fields_are_left_out_not_nulled():
    c = Cluster(id=3, file="Cluster_003.txt", size=10, generation=1, unaccounted=True)
    d = Summary(n_particles=10, generations=[], clusters=[c]).to_dict()
    assert d["clusters"] == [
        {"id": 3, "file": "Cluster_003.txt", "size": 10, "generation": 1, "unaccounted": True}
    ]
    assert "purity_curve" not in d and "posteriors" not in d
    assert d["schema_version"] == SCHEMA_VERSION


def test_older_summary_without_generation_clusters():
    """Older engines wrote sizes and stats only, no schema_version and no final_id: the
    generation clusters are built from them, their final_id in order."""
    d = {
        "n_particles": 100,
        "generations": [
            {
                "generation": 0,
                "n_images": 100,
                "cluster_sizes": [40, 30],
                "stats": [{"jaccard": 80.0}],
                "n_unaccounted": 30,
            },
            {"generation": 1, "n_images": 30, "cluster_sizes": [25]},
        ],
        "clusters": [
            {"id": i, "file": f"Cluster_{i:03d}.txt", "size": 10, "generation": 0} for i in range(3)
        ],
    }
    s = Summary.from_dict(d)
    assert [c.size for c in s.generations[0].clusters] == [40, 30]
    assert s.generations[0].clusters[0].jaccard == 80.0
    assert s.generations[0].clusters[1].jaccard is None
    assert [s.generation_final_ids(g) for g in (0, 1)] == [[0, 1], [2]]
    assert s.mode is None and s.purity_curve is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("clusters"), "the summary has no field 'clusters'"),
        (lambda d: d["clusters"][1].pop("file"), "clusters[1] has no field 'file'"),
        (
            lambda d: d["generations"][0]["clusters"][0].pop("size"),
            "generations[0] clusters[0] has no field 'size'",
        ),
        (lambda d: d.update(generations={}), "generations is not a list"),
        (
            lambda d: d.update(schema_version=SCHEMA_VERSION + 1),
            f"written by a newer sort3ddepth (schema_version {SCHEMA_VERSION + 1}; this version "
            f"reads up to {SCHEMA_VERSION}): update sort3ddepth to read it",
        ),
    ],
)
def test_bad_summary_one_line(tmp_path, change, message):
    d = _engine_summary()
    change(d)
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(d))
    with pytest.raises(SummaryError) as e:
        read_summary(path)
    assert str(e.value) == f"{path}: {message}"


def test_not_a_summary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("[1, 2]")
    with pytest.raises(SummaryError, match="not a sort3d-depth summary"):
        read_summary(path)
    path.write_text("{broken")
    with pytest.raises(SummaryError) as e:
        read_summary(path)
    assert str(e.value).startswith(f"{path}: not a JSON file") and "\n" not in str(e.value)
