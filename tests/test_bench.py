"""`python -m bench.run --quick` on tiny inputs writes the results files with the named ratios."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_bench_writes_the_named_ratios(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", "reader,trainer", "--out", str(tmp_path),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=380,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("reader_vs_raw_decode", "reader_vs_webdataset"):
        for size in ("64", "256"):
            for fmt in ("jpg", "png"):
                assert results[name][size][fmt] > 0
    assert results["trainer_step_vs_bare_loop"]["vae"] > 0
    assert results["quick"] is True
    table = (tmp_path / "results.md").read_text()
    assert "reader_vs_raw_decode" in table and "trainer_step_vs_bare_loop" in table
