"""benchmarks/train_throughput.py at a toy size: megareuse's real loop and its peers (bare,
transformers, torchtitan) run interleaved, and the JSON and the table carry every figure and the
per-round ratios (a smoke test of the script, not of the figures); and the torchtitan peer is the
same model as megareuse's (parameter count, logits and loss with the same weights)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_utils import base_env

REPO = Path(__file__).resolve().parent.parent


# in-process: every peer and a variant; isolated (a fresh process per run, ~5 s each to start):
# megareuse and one peer, enough for the per-round pairing across processes
MODES = {"in-process": ("megareuse,hf,bare,torchtitan", "sync-every-step"), "isolated": ("megareuse,hf", "none")}


# the isolated mode (~30 s: a fresh interpreter per run) is under -m slow; gpu.sh runs in-process
@pytest.mark.parametrize("where", [pytest.param(w, marks=pytest.mark.slow) if w == "isolated" else w for w in MODES])
def test_train_throughput_smoke(tmp_path, prepared, where):
    pytest.importorskip("transformers")
    out = tmp_path / "tp.json"
    peers, variants = MODES[where]
    shape = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
             "model.ffn_hidden=64", "model.vocab_size=512"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--model", "tiny", "--steps", "6",
           "--warmup", "2", "--rounds", "2", "--seq", "32", "--micro-batch", "2", "--threads", "1",
           "--peers", peers, "--variants", variants, "--data", str(prepared),
           "--json", str(out), *[a for s in shape for a in ("--set", s)],
           *(["--in-process"] if where == "in-process" else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=base_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = json.loads(out.read_text())
    assert written["complete"] is True and not list(tmp_path.glob("*.tmp"))
    point = written["points"][0]
    assert point["isolated"] == (where == "isolated")
    res = point["results"]
    assert set(res) == set(peers.split(",")) | ({f"megareuse[{variants}]"} if variants != "none" else set())
    if "torchtitan" in res and importlib.util.find_spec("torchtitan") is None:
        assert "pip install 'torchtitan>=0.2,<0.3'" in res.pop("torchtitan")["skipped"]
    for peer, r in res.items():
        assert len(r["runs"]) == 2 and r["tokens_per_s"] > 0 and r["peak_mib"] > 0, peer
        if peer != "megareuse":
            want = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(res["megareuse"]["runs"], r["runs"])]
            assert r["paired_ratios"] == pytest.approx(want)
    assert "| tiny | cpu x 1 threads | hf |" in proc.stdout


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_train_throughput", REPO / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from megareuse's rotate-half RoPE layout (dimension i paired with i + D/2) to
    torchtitan's complex one (dimension 2i paired with 2i + 1), head by head."""
    return w.view(heads, 2, w.shape[0] // heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize("tie", [True, False])
def test_torchtitan_peer_is_the_same_model(tie):
    """The torchtitan peer has megareuse's shape: the same parameter count and, with megareuse's
    weights copied in (q/k rows reordered for its RoPE layout), the same loss in float64."""
    pytest.importorskip("torchtitan.models.llama3.model.model")
    from megareuse.config import Config
    from megareuse.model import GPT

    bench = _load_benchmark()
    cfg = Config.from_dict({"model": {"vocab_size": 96, "d_model": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                      "ffn_hidden": 136, "max_seq_len": 16, "tie_embeddings": tie,
                                      "rope_theta": 500.0}, "data": {"seq_len": 16}}).validate()
    m = cfg.model
    torch.manual_seed(0)
    ours = GPT(m).double()
    with torch.no_grad():  # weights far from init, so that a misplaced row shows in the logits
        for p in ours.parameters():
            p.normal_(1.0 if p.ndim == 1 else 0.0, 0.3)
    titan, loss_fn = bench.build_torchtitan(cfg)
    titan = titan.double()
    assert sum(p.numel() for p in titan.parameters()) == sum(p.numel() for p in ours.parameters())
    src = ours.state_dict()
    with torch.no_grad():
        for name, p in titan.named_parameters():
            w = src[name]
            if name.endswith("attention.wq.weight"):
                w = _interleaved(w, m.n_heads)
            elif name.endswith("attention.wk.weight"):
                w = _interleaved(w, m.n_kv_heads)
            p.copy_(w)
    batch = torch.randint(0, m.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    want = ours(batch[:, :-1], batch[:, 1:])
    got = loss_fn(titan, batch)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    logits = ours(batch[:, :-1])
    assert logits.std() > 1.0
    torch.testing.assert_close(titan(batch[:, :-1]).float(), logits, rtol=0, atol=1e-5)


def test_partial_results_are_written_after_every_run(tmp_path):
    """A benchmark killed between runs (gpu.sh's step timeout) leaves a JSON of the runs it
    finished, marked incomplete; the medians and per-round ratios are those of the runs so far."""
    from megareuse.config import Config

    bench = _load_benchmark()
    cfg = Config.from_dict({"model": {"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                      "ffn_hidden": 64, "max_seq_len": 16}, "data": {"seq_len": 16}}).validate()
    rates = iter([100.0, 50.0, 80.0])
    path = tmp_path / "tp.json"
    seen = []

    def run(peer, r):
        if peer == "megareuse" and r == 1:
            raise KeyboardInterrupt  # killed in round 2 (bare ran first there) during megareuse's run
        return {"tokens_per_s": next(rates), "peak_mib": 1.0}

    def progress(point):
        seen.append(point)
        bench.write_json(str(path), [point], complete=False)

    with pytest.raises(KeyboardInterrupt):
        bench.measure("toy", cfg, ["megareuse", "bare"], 2, run, progress)
    got = json.loads(path.read_text())
    assert got["complete"] is False and len(seen) == 3
    assert seen[0]["results"]["bare"] == {"runs": []}
    assert seen[1]["results"]["bare"]["paired_ratios"] == [2.0]
    res = got["points"][0]["results"]
    assert res["megareuse"]["tokens_per_s"] == 100.0
    assert res["bare"]["tokens_per_s"] == 65.0 and len(res["bare"]["runs"]) == 2
    assert "paired_ratios" not in res["bare"]  # 1 run against 2: no per-round pairing is claimed
    bench.write_json(str(path), seen[-1:], complete=True)
    assert json.loads(path.read_text())["complete"] is True and not list(tmp_path.glob("*.tmp"))
