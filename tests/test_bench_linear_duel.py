"""benchmarks/bench_linear_duel.py: two implementations in worker processes of their own,
timed call by call in alternation; the JSON holds every call's time and the per-round ratio."""
import json

import pytest

import bench_linear_duel


def test_duel_alternates_and_reports_each_round(tmp_path):
    output = tmp_path / "duel.json"
    assert bench_linear_duel.main(["--impls", "mixpo", "materialised", "--tokens", "64",
                                   "--seq-len", "16", "--hidden-size", "16", "--rounds", "3",
                                   "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["implementations"] == ["mixpo", "materialised"]
    a, b = report["seconds"]
    assert len(a) == len(b) == 3 and min(a + b) > 0
    assert report["ratios"] == pytest.approx([x / y for x, y in zip(a, b)])
    assert report["median_ratio"] == pytest.approx(sorted(report["ratios"])[1])
    mixpo, materialised = report["ready"]
    assert mixpo["loss"] == pytest.approx(materialised["loss"], rel=1e-5)   # same loss
    assert mixpo["peak_extra_mib"] >= 0 and materialised["peak_extra_mib"] > 0
    assert output.with_suffix(".png").is_file()
