"""Triton's perf_analyzer against the real server, over gRPC and HTTP: a short run
at concurrency 1, 4 and 16 on resnet50 (it reads ModelMetadata and
ModelConfig first, then sends FP32 batches of 1, zeros: its "random" data is
random bytes, NaN among them, which the server refuses as a bad tensor)."""
import csv
import os
import subprocess

import pytest

from conftest import ROOT

PA = os.path.join(ROOT, ".deps", "perf-analyzer", "perf_analyzer")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer(server, tmp_path, protocol):
    if not os.path.exists(PA):
        pytest.skip("perf_analyzer missing: scripts/setup.sh clients")
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(ROOT, ".deps", "perf-analyzer", "lib"))
    report = tmp_path / "pa.csv"
    window = os.environ.get("PA_WINDOW_MS", "1500")
    out = subprocess.run(
        [PA, "-m", "resnet50", "-u", server["grpc" if protocol == "grpc" else "rest"], "-i", protocol, "-b", "1", "--input-data", "zero",
         "--concurrency-range", "1:16:3", "-p", window, "-r", "4", "-s", "50", "-f", str(report)],
        capture_output=True, text=True, env=env, timeout=600)
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = list(csv.DictReader(open(report)))
    levels = {int(r["Concurrency"]): float(r["Inferences/Second"]) for r in rows}
    assert {1, 4, 16} <= set(levels), levels
    assert all(v > 0 for v in levels.values()), levels
    print(f"perf_analyzer resnet50 {protocol} inferences/s by concurrency:", levels)
