"""benchmarks/scaling.py with a tiny configuration: it prints each figure and the ratios last."""

import os
import re
import subprocess
import sys

from tests.helpers import REPO


def test_scaling_benchmark_prints_its_figures_and_the_ratio_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--build-cases", "1", "--build-size", "32",
         "--build-slices", "4,5", "--slices", "4,8,16", "--size", "32", "--filters", "2", "--depth", "1",
         "--batch-size", "4", "--score-sizes", "16,32", "--score-slices", "8", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    number = r"\d+\.\d+"
    # every slice of one phantom of 4-5 slices (one case: no process pool, so the test stays quick)
    assert re.fullmatch(r"build-records, 1 phantoms 32x32x4-5, [45] examples \(every slice\), best of 1:", lines[0])
    workers = [re.fullmatch(rf"  ([12]) worker\(s\): {number} slices/s", line).group(1) for line in lines[1:3]]
    assert workers == ["1", "2"]
    assert [re.fullmatch(rf"  (\d+) slices: {number} s per volume, {number} ms per slice", line).group(1)
            for line in lines[4:7]] == ["4", "8", "16"]
    # the large scored pair is the small one scaled by 2 along every axis: 16x16x8 and 32x32x16
    assert lines[7].startswith("evaluate (lits2017 case_metrics), phantom pairs 16²x8 and 32²x16 (x2 along")
    surfaces = [int(re.search(r"liver surface (\d+) voxels, volume (\d+) voxels$", line).group(1))
                for line in lines[8:10]]
    assert surfaces[1] > 2 * surfaces[0]
    assert re.fullmatch(rf"ratios: build 2 / 1 workers {number}x; predict per slice 16 / 4 slices {number}x "
                        rf"\(1\.00 = linear\); scoring 32² / 16² {number}x \(surface x{number}, volume x{number}\)",
                        lines[-1]), lines[-1]
