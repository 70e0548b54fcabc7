"""Bad input everywhere: every command refuses it with exit code 2, one stderr line naming what
is wrong and what is accepted, and writes nothing (the directory tree is unchanged)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from distributed_utils import CONFIG, tiny_args
from megareuse.cli import main


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    """A 2-step tiny base run: a good checkpoint and a copy with one flipped byte."""
    import shutil

    from megareuse.config import load_config
    from megareuse.engine.trainer import Trainer
    root = tmp_path_factory.mktemp("bad_input")
    cfg = load_config(CONFIG, tiny_args(prepared, root / "base", "run.train_tokens=512")[2:])
    Trainer(cfg, emit=lambda s: None).run()
    good = root / "base" / "checkpoints" / "step_00000002"
    flipped = root / "flipped" / "checkpoints" / "step_00000002"
    shutil.copytree(good, flipped)
    shard = flipped / "state" / "__0_0.distcp"  # the one rank's share of the sharded state
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x10
    shard.write_bytes(bytes(data))
    return good, flipped


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def cases(prepared, good, flipped, tmp):
    out = str(tmp / "out")
    train = ["train", "--config", CONFIG, f"data.dir={prepared}", f"run.out_dir={out}", "model.vocab_size=512"]
    (tmp / "bad.csv").write_text("D1,D2,loss\n1e6,1e6,3.1\n2e6,1e6,oops\n")
    (tmp / "good.csv").write_text("D1,D2,loss\n" + "".join(f"{a}e6,{b}e6,{3 + 1 / (a * b)}\n"
                                                            for a in (1, 2, 4) for b in (1, 2, 4)))
    (tmp / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    return {
        "config file missing": (["train", "--config", str(tmp / "nope.yaml")], "does not exist"),
        "unknown key": ([*train, "optim.learning_rate=1"], "unknown key 'optim.learning_rate'"),
        "guard action": ([*train, "guard.on_divergence=retry"], "accepted one of rollback, stop"),
        "guard signal": ([*train, "guard.signals=[SIGKILL]"], "accepted one of SIGTERM, SIGUSR1"),
        "guard lr factor": ([*train, "guard.lr_factor=2"], "guard.lr_factor = 2.0: accepted a number in (0, 1]"),
        "ds_config batch": ([*train, f"parallel.ds_config={tmp / 'ds.json'}"],
                            "train_micro_batch_size_per_gpu = 3 but the run config gives"),
        "resume missing": ([*train, "--resume", str(tmp / "none")], "does not exist"),
        "resume corrupt": ([*train, "--resume", str(flipped)], "state/__0_0.distcp fails its sha256 checksum"),
        "resume other shape": ([*train, "--resume", str(good), "model.n_layers=3"], "another model shape"),
        "vocab too small": ([*train, "model.vocab_size=300"], "smaller than the tokenizer's vocabulary (512)"),
        "init from other shape": (["train", "--init-from", str(good), *train[1:], "model.n_layers=3"],
                                  "n_layers"),
        "init from corrupt": ([*train, "--init-from", str(flipped)], "fails its sha256"),
        "evaluate corrupt": (["evaluate", "--checkpoint", str(flipped)], "fails its sha256"),
        "evaluate tokens": (["evaluate", "--checkpoint", str(good), "--tokens", "-5"], "--tokens = -5"),
        "fit bad number": (["fit", "--runs", str(tmp / "bad.csv"), "--out", out], "'oops' is not a number"),
        "fit missing table": (["fit", "--runs", str(tmp / "none.csv"), "--out", out], "none.csv"),
        "fit unknown form": (["fit", "--runs", str(tmp / "good.csv"), "--form", "nope", "--out", out],
                             "form = 'nope': accepted"),
        "grow width": (["grow", "--from", str(good), "--out", out, "--width", "0"], "width"),
        "grow corrupt": (["grow", "--from", str(flipped), "--out", out, "--width", "2"], "fails its sha256"),
        "sweep workers": (["sweep", "--config", "configs/experiments/demo.yaml", "--out", out, "--workers", "0"],
                          "--workers = 0"),
        "estimate world": (["estimate", "--config", CONFIG, "--world-size", "3", "parallel.tp=2"], "3"),
        "prepare domain": (["prepare", "--out", out, "--domains", "poetry"], "poetry"),
    }


CASES = ["config file missing", "unknown key", "guard action", "guard signal", "guard lr factor",
         "ds_config batch", "resume missing", "resume corrupt", "resume other shape", "vocab too small",
         "init from other shape",
         "init from corrupt", "evaluate corrupt", "evaluate tokens", "fit bad number",
         "fit missing table", "fit unknown form", "grow width", "grow corrupt", "sweep workers",
         "estimate world", "prepare domain"]


@pytest.mark.parametrize("case", CASES)
def test_refused_with_one_line_exit_2_nothing_written(prepared, checkpoint, tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    argv, expected = cases(prepared, *checkpoint, tmp_path)[case]
    before = snapshot(tmp_path), snapshot(checkpoint[0].parent.parent)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert (snapshot(tmp_path), snapshot(checkpoint[0].parent.parent)) == before
    assert not (tmp_path / "out").exists()
