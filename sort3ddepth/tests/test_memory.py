"""The memory model (memory.py): it follows the streamed layout (N x nx^2 per particle, the full
box only in fixed-size terms), and a run that cannot fit is refused with the numbers and a
remedy that works."""

import re

import numpy as np
import pytest

from sort3ddepth.engine import cli, memory
from sort3ddepth.tests.sorting_data import make_star


def test_per_particle_memory_follows_the_sorting_size_not_the_box():
    n1, n2 = 50_000, 100_000
    for nx in (64, 96):
        growth = [
            memory.bytes_per_rank(n2, box, 2, nx) - memory.bytes_per_rank(n1, box, 2, nx)
            for box in (192, 256, 360)
        ]
        assert growth[0] == growth[1] == growth[2]  # no N x box^2 term
        per = growth[0] / (n2 - n1)
        # each rank holds half the particles at nx: comparison + reconstruction images (+ copy)
        assert per >= 0.5 * nx * (nx // 2 + 1) * 8 * 2
    assert memory.bytes_per_rank(n2, 192, 2, 96) > memory.bytes_per_rank(n2, 192, 2, 64)


def test_the_document_case_on_one_24_gb_node(monkeypatch):
    """EMPIAR-10028 (105,247 x 360 px), 2 ranks on a 24 GB node with the default 5 GB overhead:
    refused at the largest sorting size the FSC rule can pick for 360 px (120), with an
    --nxinit that fits; at 88 px it fits."""
    monkeypatch.delenv("MPI_LOCALNRANKS", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    assert memory.largest_sorting_size(360) == 120
    msg = memory.check(105_247, 360, 2, memory_per_node=24, overhead=5, nx=-1, log=lambda *a: None)
    nx = int(re.search(r"--nxinit (\d+)", msg).group(1))
    assert 88 <= nx < 120
    assert (
        memory.check(105_247, 360, 2, memory_per_node=24, overhead=5, nx=88, log=lambda *a: None)
        is None
    )
    assert 2 * memory.bytes_per_rank(105_247, 360, 2, 88) < 19 * memory.GB


def test_refusal_names_the_numbers_and_an_nxinit_that_fits(monkeypatch):
    monkeypatch.delenv("MPI_LOCALNRANKS", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    msg = memory.check(200_000, 360, 2, memory_per_node=24, overhead=5, nx=-1, log=lambda *a: None)
    assert msg is not None
    assert "--memory_per_node 24.0 GB minus --overhead 5 GB leaves 19.0 GB" in msg
    assert "2 rank(s) sorting 200000 images of 360 px at 120 px need about" in msg
    need = float(re.search(r"need about ([\d.]+) GB", msg).group(1))
    assert need == pytest.approx(
        2 * memory.bytes_per_rank(200_000, 360, 2, 120) / memory.GB, abs=0.06
    )
    nx = int(re.search(r"--nxinit (\d+)", msg).group(1))
    assert 16 <= nx < 120
    # the advice works: with that --nxinit the same run fits, with 2 px more it does not
    assert (
        memory.check(200_000, 360, 2, memory_per_node=24, overhead=5, nx=nx, log=lambda *a: None)
        is None
    )
    assert (
        memory.check(
            200_000, 360, 2, memory_per_node=24, overhead=5, nx=nx + 2, log=lambda *a: None
        )
        is not None
    )


def test_refusal_asks_for_fewer_ranks_per_node_when_the_sorting_size_cannot_help(monkeypatch):
    monkeypatch.setenv("MPI_LOCALNRANKS", "8")
    msg = memory.check(20_000, 360, 8, memory_per_node=12, overhead=2, nx=64, log=lambda *a: None)
    assert msg is not None and "8 rank(s)" in msg
    m = re.search(r"use .*?(\d+) rank\(s\) per node", msg)
    assert m, msg
    r = int(m.group(1))
    assert 1 <= r < 8
    assert r * memory.bytes_per_rank(20_000, 360, 8, 64) <= 10 * memory.GB
    assert (r + 1) * memory.bytes_per_rank(20_000, 360, 8, 64) > 10 * memory.GB


def test_cli_refuses_before_reading_images_with_a_remedy(tmp_path, capsys):
    star, _ = make_star(tmp_path, n_per_class=30, n_classes=2, box=32, snr=2.0)
    out = tmp_path / "out"
    code = cli.run(
        [
            "--instack",
            str(star),
            "--output_dir",
            str(out),
            "--memory_per_node",
            "0.2",
            "--overhead",
            "0.1",
            "--img_per_grp",
            "30",
        ]
    )
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1, err
    line = err[0]
    assert "--memory_per_node 0.2 GB minus --overhead 0.1 GB leaves 0.1 GB" in line
    assert "60 images of 32 px" in line and "need about" in line and ": use " in line
    assert "pre-processing" not in (out / "log.txt").read_text()
    assert not (out / "summary.json").exists()


def test_breakdown_terms_add_up():
    b = memory.breakdown(10_000, 128, 2, 64)
    total = memory.bytes_per_rank(10_000, 128, 2, 64)
    assert total == b["fixed"] + b["metadata"] + b["sorting_data"] + b["maps"]
    assert b["nx"] == 64 and np.isfinite(total)


def test_maps_term_counts_two_half_maps_per_group():
    """A run with K given holds 2 K sorting maps (up to options.MAX_GROUPS = 29 groups), search
    mode starts with 7: the maps term follows the run's K, not a fixed count."""
    maps = {k: memory.breakdown(20_000, 128, 2, 96, n_groups=k)["maps"] for k in (7, 14, 29)}
    assert maps[14] == 2 * maps[7] and maps[29] * 7 == maps[7] * 29
    assert memory.breakdown(20_000, 128, 2, 96)["maps"] == maps[7]
    opts = dict(memory_per_node=24, overhead=5, nx=96, log=lambda *a: None)
    assert memory.check(20_000, 128, 2, n_groups=7, **opts) is None
    assert "need about" in memory.check(20_000, 128, 2, n_groups=29, **opts)
