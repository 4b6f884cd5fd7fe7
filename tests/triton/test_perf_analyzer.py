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
    window = os.environ.get("PA_WINDOW_MS", "1500")
    levels = {}
    for c in (1, 4, 16):
        report = tmp_path / f"pa-{c}.csv"
        # A short run on a shared CI machine: stability is not the point
        # (-s 100 takes the first measurement), that the tool runs is.
        out = subprocess.run(
            [PA, "-m", "resnet50", "-u", server["grpc" if protocol == "grpc" else "rest"], "-i", protocol, "-b", "1",
             "--input-data", "zero", "--concurrency-range", f"{c}:{c}", "-p", window, "-r", "3", "-s", "100",
             "-f", str(report)],
            capture_output=True, text=True, env=env, timeout=300)
        print(out.stdout[-1500:])
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        rows = list(csv.DictReader(open(report)))
        assert len(rows) == 1 and int(rows[0]["Concurrency"]) == c, rows
        levels[c] = float(rows[0]["Inferences/Second"])
    assert all(v > 0 for v in levels.values()), levels
    print(f"perf_analyzer resnet50 {protocol} inferences/s by concurrency:", levels)
