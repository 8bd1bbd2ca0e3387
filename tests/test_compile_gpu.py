"""Every kernel configuration the dispatcher can pick compiles for A100 (sm_80) and H100
(sm_90) and fits in shared memory, proven on a machine without a GPU (see
mixpo/kernels/compile_check.py). Records land in benchmarks/results/compile_report.json."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "records.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "mixpo.kernels.compile_check",
                             "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    assert out.exists(), result.stderr[-3000:]
    return json.loads(out.read_text()), result


def test_every_config_compiles_for_sm80_and_sm90(records):
    records, result = records
    failures = [record for record in records if not record["ok"]]
    assert not failures, json.dumps(failures, indent=1)[:4000]
    assert result.returncode == 0


def test_table_covers_every_kernel_and_both_archs(records):
    records, _ = records
    from mixpo.kernels import configs

    compiled = {(record["kernel"], record["arch"]) for record in records}
    for name in configs.KERNELS:
        assert (name, 80) in compiled and (name, 90) in compiled
    for record in records:
        assert record["shared_bytes"] <= record["shared_limit"]
