"""benchmarks/train_throughput.py at a toy size: megareuse's real loop, the bare loop and the
transformers loop all run, interleaved, and the JSON and the table carry every figure and the
per-round ratios (a smoke test of the script, not of the figures)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_utils import base_env

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("where", ["isolated", "in-process"])
def test_train_throughput_smoke(tmp_path, prepared, where):
    pytest.importorskip("transformers")
    out = tmp_path / "tp.json"
    shape = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
             "model.ffn_hidden=64", "model.vocab_size=512"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--model", "tiny", "--steps", "6",
           "--warmup", "2", "--rounds", "2", "--seq", "32", "--micro-batch", "2", "--threads", "1",
           "--peers", "megareuse,hf,bare", "--variants", "sync-every-step", "--data", str(prepared),
           "--json", str(out), *[a for s in shape for a in ("--set", s)],
           *(["--in-process"] if where == "in-process" else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=base_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    point = json.loads(out.read_text())["points"][0]
    assert point["isolated"] == (where == "isolated")
    res = point["results"]
    assert set(res) == {"megareuse", "hf", "bare", "megareuse[sync-every-step]"}
    for peer, r in res.items():
        assert len(r["runs"]) == 2 and r["tokens_per_s"] > 0 and r["peak_mib"] > 0, peer
        if peer != "megareuse":
            want = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(res["megareuse"]["runs"], r["runs"])]
            assert r["paired_ratios"] == pytest.approx(want)
    assert "| tiny | cpu x 1 threads | hf |" in proc.stdout
