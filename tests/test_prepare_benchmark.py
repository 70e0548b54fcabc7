"""benchmarks/prepare.py on a 1 MB input: every pipeline runs, the token totals agree, the JSON
has the figures (a smoke test of the script, not of the figures)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_prepare_benchmark_tiny(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "prepare.py"), "--mb", "1", "--workers", "2",
                           "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert {"date", "cpus", "input_mb", "command", "runs", "checks"} <= set(report)
    runs = {(r["pipeline"], r["workers"]): r for r in report["runs"]}
    assert set(runs) == {("baseline", 1), ("megareuse", 2), ("datasets", 2)}
    assert len({r["tokens"] for r in runs.values()}) == 1 and runs["baseline", 1]["tokens"] > 0
    for r in runs.values():
        assert r["wall_s"] > 0 and r["mb_per_s"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["peak_rss_max_process_mib"] and 0 < r["peak_rss_sum_mib"]
    assert report["checks"][0].startswith("token totals agree")
    assert "| megareuse | 2 |" in proc.stdout
