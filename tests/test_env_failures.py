"""Failures of the environment and of input files (issue #15 items 5-7, 9, 10): a full disk, a
read-only or permission-denied path, a file where a directory belongs (or the reverse), garbage
or mismatched files, a missing GPU, Ctrl-C. Each ends with one stderr line naming the path or
field and what is wrong, exit code 2 (130 for SIGINT), and leaves what existed intact."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distributed_utils import CONFIG, REPO, base_env, tiny_args
from megareuse.cli import main
from megareuse.data import IndexedDataset
from megareuse.engine import checkpoint as ckpt
from test_bad_input import snapshot

FAST = ["run.train_tokens=512", "run.eval_interval=2", "run.eval_tokens=256"]  # 2 steps


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
    """A 2-step base run and a 2-step CPT run from it."""
    from megareuse.config import load_config
    from megareuse.engine.trainer import Trainer
    root = tmp_path_factory.mktemp("env")
    Trainer(load_config(CONFIG, tiny_args(prepared, root / "base", *FAST)[2:]), emit=lambda s: None).run()
    base = root / "base" / "checkpoints" / "step_00000002"
    cpt_args = tiny_args(prepared, root / "cpt", *FAST, f"run.init_from={base}", "data.train={code: 1}")
    Trainer(load_config(CONFIG, cpt_args[2:]), emit=lambda s: None).run()
    return base, root / "cpt" / "checkpoints" / "step_00000002"


def refused(argv, capsys, expected, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    return err[0]


def train_argv(prepared, out, *extra):
    return ["train", *tiny_args(prepared, out, *FAST, *extra)]


def copy_data(prepared, dest: Path) -> Path:
    shutil.copytree(prepared, dest)
    return dest


# ---------------------------------------------------------------- paths of the wrong kind
def test_out_dir_that_is_a_file_or_under_one(prepared, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    refused(train_argv(prepared, tmp_path / "f"), capsys, "run.out_dir = ")
    line = refused(train_argv(prepared, tmp_path / "f" / "sub"), capsys, "cannot be created")
    assert f"{tmp_path / 'f'} is a file, not a directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"] and (tmp_path / "f").read_text() == "x"


def test_inputs_of_the_wrong_kind_are_named_as_such(prepared, runs, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    refused(["evaluate", "--checkpoint", str(tmp_path / "f")], capsys, "is a file, not a directory")
    refused(["evaluate", "--checkpoint", str(tmp_path / "nope")], capsys, "does not exist")
    refused(["evaluate", "--checkpoint", str(tmp_path)], capsys, "no manifest.json (not a checkpoint")
    refused(train_argv(prepared, tmp_path / "o", "--resume", str(tmp_path / "f")), capsys,
            "--resume '%s': is a file, not a directory" % (tmp_path / "f"))
    refused(train_argv(prepared, tmp_path / "o", f"run.init_from={tmp_path / 'f'}"), capsys,
            "run.init_from = '%s' is a file, not a directory" % (tmp_path / "f"))
    refused(["train", "--config", str(tmp_path)], capsys, "is a directory, not a file")
    refused(train_argv(tmp_path / "f", tmp_path / "o"), capsys, "data.dir = '%s' is a file" % (tmp_path / "f"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


# ---------------------------------------------------------------- garbage and mismatched files
def test_garbage_tokenizer_and_binary_config(prepared, tmp_path, capsys):
    data = copy_data(prepared, tmp_path / "data")
    (data / "tokenizer.model").write_bytes(b"\x00garbage\xff" * 10)
    refused(train_argv(data, tmp_path / "o"), capsys, "tokenizer.model is not a sentencepiece model")
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfe\x00 not text")
    refused(["train", "--config", str(tmp_path / "c.yaml")], capsys, "is not UTF-8 text")
    assert not (tmp_path / "o").exists()


def test_token_ids_beyond_the_vocabulary_are_refused_before_anything_is_written(prepared, tmp_path, capsys):
    data = copy_data(prepared, tmp_path / "data")
    tokens = np.memmap(data / "code_valid.bin", dtype=np.uint16, mode="r+")
    tokens[17] = 600  # same size, valid index: only the ids are wrong (the tokenizer has 512)
    tokens.flush()
    del tokens
    lo = int(np.min(IndexedDataset(data / "code_valid").tokens))
    line = refused(train_argv(data, tmp_path / "o"), capsys, f"code_valid.bin holds token ids {lo}..600")
    assert "has 512 (accepted ids 0..511)" in line
    assert not (tmp_path / "o").exists()


def test_token_range_cache_follows_the_file(prepared, tmp_path):
    data = copy_data(prepared, tmp_path / "data")
    ds = IndexedDataset(data / "prose_valid")
    exact = (int(np.min(ds.tokens)), int(np.max(ds.tokens)))
    assert ds.token_range() == exact
    cache = json.loads((data / "prose_valid.ids.json").read_text())
    assert (cache["min"], cache["max"]) == exact
    tokens = np.memmap(data / "prose_valid.bin", dtype=np.uint16, mode="r+")
    tokens[0] = 511
    tokens.flush()
    del tokens
    os.utime(data / "prose_valid.bin", ns=(time.time_ns(), time.time_ns() + 10**9))  # a rewrite
    assert IndexedDataset(data / "prose_valid").token_range()[1] == 511  # rescanned, not the stale cache


def test_manifest_entry_without_a_size(runs, tmp_path, capsys):
    bad = tmp_path / "ckpt"
    shutil.copytree(runs[0], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["files"]["state/index.json"]["bytes"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    refused(["evaluate", "--checkpoint", str(bad)], capsys, "entry 'state/index.json' lacks an integer 'bytes'")
    manifest["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    del manifest["files"]["state/index.json"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    refused(["evaluate", "--checkpoint", str(bad)], capsys, "points outside the checkpoint")


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"schema": "megareuse-run-record/1"})])
def test_corrupt_record_in_collect(tmp_path, capsys, content):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "record.json").write_text(content)
    before = snapshot(tmp_path)
    refused(["collect", str(tmp_path / "runs")], capsys, "runs/a/record.json")
    assert snapshot(tmp_path) == before


def test_evaluate_checks_the_tokenizer_of_the_data(prepared, runs, tmp_path, capsys):
    from megareuse.data.tokenizer import train_tokenizer
    data = copy_data(prepared, tmp_path / "data")
    text = [p.read_text() for p in sorted((REPO / "docs").glob("*.md"))]
    train_tokenizer(text, data / "tokenizer", 512)  # same size, other pieces: ids mean other text
    refused(["evaluate", "--checkpoint", str(runs[0]), "--data", str(data)], capsys,
            "records tokenizer_sha256")  # the data dir's own record says so first
    import hashlib
    record = json.loads((data / "prepare.json").read_text())  # a directory prepared with that tokenizer
    record["tokenizer_sha256"] = hashlib.sha256((data / "tokenizer.model").read_bytes()).hexdigest()
    (data / "prepare.json").write_text(json.dumps(record))
    refused(["evaluate", "--checkpoint", str(runs[0]), "--data", str(data)], capsys,
            "was prepared with another tokenizer")


def test_evaluate_a_cpt_checkpoint_whose_base_is_gone(runs, tmp_path, capsys):
    base, cpt = runs
    moved = tmp_path / "base_moved"
    shutil.move(base.parent.parent, moved)  # the whole base run directory is gone
    try:
        assert main(["evaluate", "--checkpoint", str(cpt)]) == 0
        losses = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert set(losses) == {"prose", "code"} and all(np.isfinite(v) for v in losses.values())
    finally:
        shutil.move(moved, base.parent.parent)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(runs, capsys):
    refused(["evaluate", "--checkpoint", str(runs[0]), "--device", "cuda"], capsys,
            "--device = 'cuda' but no CUDA device is available")
    refused(["evaluate", "--checkpoint", str(runs[0]), "--device", "tpu"], capsys, "accepted one of cpu, cuda, auto")


# ---------------------------------------------------------------- OS failures, for real
def _namespace_tool_missing() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return None if probe.returncode == 0 else "user+mount namespaces are not available here"


def _one_line(proc: subprocess.CompletedProcess, code: int) -> str:
    lines = proc.stderr.strip().splitlines()
    lines = [line for line in lines if not line.startswith("DeepSpeed ")]  # the CPU op prebuild note
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    return lines[0]


@pytest.mark.skipif(_namespace_tool_missing() is not None, reason=str(_namespace_tool_missing()))
def test_full_disk_during_a_checkpoint_keeps_the_earlier_one(prepared, tmp_path):
    """A 900 kB file system holds one checkpoint (~0.57 MB) but not two: the second write fails."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    out = mnt / "run"
    args = train_argv(prepared, out, "run.save_interval=1", "run.keep_last=5", "run.train_tokens=1024")
    script = f"mount -t tmpfs -o size=900k none {mnt} && \"$@\"; rc=$?; " \
             f"ls -a {out} {out}/checkpoints > {tmp_path}/ls.txt; " \
             f"python_ok=$({sys.executable} -c 'import sys; from megareuse.engine.checkpoint import latest_checkpoint; " \
             f"print(latest_checkpoint(sys.argv[1]).name)' {out}/checkpoints); echo $python_ok > {tmp_path}/latest.txt; exit $rc"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "megareuse.cli", *args],
                          env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    line = _one_line(proc, 2)
    assert "no space left on the device" in line and "earlier checkpoints are intact" in line, line
    listing = (tmp_path / "ls.txt").read_text().split()
    assert "step_00000001" in listing and not [n for n in listing if n.startswith(".tmp-")], listing
    assert ".megareuse.lock" not in listing  # released on the way out
    assert (tmp_path / "latest.txt").read_text().strip() == "step_00000001"  # verifies, checksums and all


@pytest.mark.skipif(_namespace_tool_missing() is not None, reason=str(_namespace_tool_missing()))
def test_read_only_out_dir_and_data_dir(prepared, tmp_path):
    ro = tmp_path / "ro"
    (ro / "run").mkdir(parents=True)
    data = copy_data(prepared, ro / "data")
    for name in list(data.glob("*.ids.json")):
        name.unlink()  # the token-range scan cannot cache its result here: training still starts
    bind = ["unshare", "-rm", "sh", "-c", f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && exec \"$@\"", "sh"]
    proc = subprocess.run([*bind, sys.executable, "-m", "megareuse.cli", *train_argv(data, ro / "run")],
                          env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    line = _one_line(proc, 2)
    assert f"run.out_dir = '{ro / 'run'}' is not writable (read-only file system)" in line, line
    out = tmp_path / "rw"
    proc = subprocess.run([*bind, sys.executable, "-m", "megareuse.cli", *train_argv(data, out)],
                          env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]  # read-only data trains
    assert sorted(p.name for p in (ro / "run").iterdir()) == [] and not list(data.glob("*.ids.json"))


def test_unreadable_inputs_are_named_as_unreadable(prepared, tmp_path):
    """Mode-000 files: as root the command runs without the capabilities that bypass permissions."""
    wrap = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv is needed to drop root's permission override")
        caps = "-dac_override,-dac_read_search"
        wrap = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]
    data = copy_data(prepared, tmp_path / "data")
    (data / "tokenizer.model").chmod(0o000)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(Path(CONFIG).read_text())
    cfg.chmod(0o000)
    run = lambda argv: subprocess.run([*wrap, sys.executable, "-m", "megareuse.cli", *argv], env=base_env(),
                                      cwd=REPO, capture_output=True, text=True, timeout=180)  # noqa: E731
    try:
        line = _one_line(run(train_argv(data, tmp_path / "out")), 2)
        assert f"{data / 'tokenizer.model'} is not readable (permission denied)" in line, line
        line = _one_line(run(["train", "--config", str(cfg)]), 2)
        assert f"config file '{cfg}' is not readable (permission denied)" in line, line
        table = tmp_path / "runs.csv"
        table.write_text("D1,D2,loss\n1e6,1e6,3.0\n")
        table.chmod(0o000)
        line = _one_line(run(["fit", "--runs", str(table), "--out", str(tmp_path / "out")]), 2)
        assert f"runs table '{table}' is not readable (permission denied)" in line and "write" not in line.split(";")[0], line
        assert not (tmp_path / "out").exists()
    finally:
        for path in (data / "tokenizer.model", cfg, tmp_path / "runs.csv"):
            if path.exists():
                path.chmod(0o644)


def test_ctrl_c_exits_130_with_one_line_and_leaves_a_resumable_run(prepared, tmp_path):
    out = tmp_path / "run"
    args = train_argv(prepared, out, "run.train_tokens=400000", "run.save_interval=5", "run.eval_interval=100000",
                      "run.log_interval=1")
    # a shell's background job inherits SIGINT ignored (and Python then installs no handler): restore it
    proc = subprocess.Popen([sys.executable, "-m", "megareuse.cli", *args], env=base_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not ckpt.step_dirs(out / "checkpoints"):
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in err.strip().splitlines() if not line.startswith("DeepSpeed ")]
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted (SIGINT)" in lines[0], (proc.returncode, err[-3000:])
    assert not (out / ".megareuse.lock").exists()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    last = ckpt.latest_checkpoint(out / "checkpoints")  # what --resume auto continues from
    assert last is not None and ckpt.read_meta(last)["step"] >= 5


# ---------------------------------------------------------------- contents that pass checksums
def _rehash(ckpt_dir: Path) -> None:
    """Re-write the manifest for the files as they are now: the damage is past the checksums."""
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    for name in manifest["files"]:
        file = ckpt_dir / name
        manifest["files"][name] = {"bytes": file.stat().st_size, "sha256": ckpt.file_sha256(file)}
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, expected", [
    ("meta garbage", "meta.json is not valid JSON"),
    ("meta list", "holds no config mapping"),
    ("meta no model", "config.model is missing"),
    ("meta D1 text", "field 'D1' = 'many' has the wrong type"),
    ("weights garbage", "index.json is not a readable weights file"),
    ("weights chunk garbage", "state/__0_0.distcp: the chunk of model.tok_embeddings.weight"),
    ("weights of another shape", "tok_embeddings.weight has shape (512, 64)"),
])
@pytest.mark.parametrize("command", ["evaluate", "init-from", "grow", "export-hf"])
def test_checkpoint_contents_are_checked_where_they_are_read(prepared, runs, tmp_path, capsys, damage, expected, command):
    bad = tmp_path / "ckpt"
    shutil.copytree(runs[0], bad)
    meta = json.loads((bad / "meta.json").read_text())
    if damage == "meta garbage":
        (bad / "meta.json").write_text("{not json")
    elif damage == "meta list":
        (bad / "meta.json").write_text("[]")
    elif damage == "meta no model":
        del meta["config"]["model"]
        (bad / "meta.json").write_text(json.dumps(meta))
    elif damage == "meta D1 text":
        meta["D1"] = "many"
        (bad / "meta.json").write_text(json.dumps(meta))
    elif damage == "weights garbage":
        (bad / "state" / "index.json").write_bytes(b"\xff" * 64)
    elif damage == "weights chunk garbage":  # the index is fine, the bytes it points at are not
        (bad / "state" / "__0_0.distcp").write_bytes(b"\xff" * (bad / "state" / "__0_0.distcp").stat().st_size)
    else:  # a well-formed index of a model twice as wide
        index = json.loads((bad / "state" / "index.json").read_text())
        index["tensors"]["model.tok_embeddings.weight"]["shape"][1] *= 2
        (bad / "state" / "index.json").write_text(json.dumps(index))
    _rehash(bad)
    argv = {"evaluate": ["evaluate", "--checkpoint", str(bad)],
            "init-from": train_argv(prepared, tmp_path / "o", f"run.init_from={bad}"),
            "grow": ["grow", "--from", str(bad), "--out", str(tmp_path / "o"), "--width", "2"],
            "export-hf": ["export-hf", "--from", str(bad), "--out", str(tmp_path / "o")]}[command]
    if command == "init-from" and damage.startswith("meta D1"):
        expected = "field 'D1'"
    refused(argv, capsys, expected)
    assert not (tmp_path / "o").exists()


def test_grow_refuses_a_result_that_cannot_fit_in_memory(runs, tmp_path, capsys):
    refused(["grow", "--from", str(runs[0]), "--out", str(tmp_path / "o"), "--width", "4000"], capsys,
            "GiB of memory to grow; this machine has")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit, expected", [
    (lambda law: law.update(theta=[float("nan")] * len(law["theta"])), "theta = "),
    (lambda law: law.update(theta={"a": 1}), "theta = "),
    (lambda law: law["params"].update({next(iter(law["params"])): 123.0}), "do not follow from 'theta'"),
    (lambda law: law.update(units={"tokens": -1}), "units = "),
])
def test_a_hand_edited_law_file_is_refused(tmp_path, capsys, edit, expected):
    rows = "".join(f"{a}e6,{b}e6,{3 + 1 / (a * b) ** 0.3:.6f}\n" for a in (1, 2, 4, 8) for b in (1, 2, 4))
    (tmp_path / "runs.csv").write_text("D1,D2,loss\n" + rows)
    assert main(["fit", "--runs", str(tmp_path / "runs.csv"), "--form", "reuse_no_interaction",
                 "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0
    capsys.readouterr()
    law = json.loads((tmp_path / "fit" / "law.json").read_text())
    edit(law)
    (tmp_path / "fit" / "law.json").write_text(json.dumps(law))
    refused(["plan", "--law", str(tmp_path / "fit" / "law.json"), "--D1", "1M", "--D2", "1M",
             "--out", str(tmp_path / "plan")], capsys, expected)
    assert not (tmp_path / "plan").exists()


@pytest.mark.parametrize("content", [b"\xc8\x00binary", b"[1, 2]"])
def test_hf_directory_with_garbage_files(runs, tmp_path, capsys, content):
    out = tmp_path / "hf"
    assert main(["export-hf", "--from", str(runs[0]), "--out", str(out)]) == 0
    capsys.readouterr()
    for name in ("config.json", "model.safetensors"):
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(out, bad)
        (bad / name).write_bytes(content)
        refused(["import-hf", "--from", str(bad), "--out", str(tmp_path / "o"), "--d1", "1000"], capsys, name)
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, expected", [
    (b"\xf2\x00binary", "is not UTF-8 text"), (b"- a\n- b\n", "must hold a mapping"),
    (b"train_config: 7\n", "train_config = 7"), (b"train_config: x.yaml\noverrides: 3\n", "overrides = 3"),
])
def test_garbage_experiment_file(tmp_path, capsys, content, expected):
    (tmp_path / "exp.yaml").write_bytes(content)
    refused(["sweep", "--config", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "o"), "--dry-run"], capsys, expected)


def test_prepare_force_replaces_only_prepared_data(tmp_path, capsys):
    victim = tmp_path / "mine"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    refused(["prepare", "--out", str(victim), "--force"], capsys, "which is not a prepared data directory")
    assert (victim / "thesis.tex").read_text() == "years of work"
    (tmp_path / "f").write_text("x")
    refused(["prepare", "--out", str(tmp_path / "f"), "--force"], capsys, "is a file, not a directory")
    assert (tmp_path / "f").read_text() == "x"


def test_third_round_garbage_trainer_state_ds_config_list_and_zero_nodes(prepared, runs, tmp_path, capsys):
    bad = tmp_path / "ckpt"
    shutil.copytree(runs[0], bad)
    (bad / "trainer.pt").write_bytes(b"not a pickle")
    _rehash(bad)
    refused(train_argv(prepared, tmp_path / "o", "--resume", str(bad)), capsys, "trainer.pt is not readable by torch.load")
    (tmp_path / "ds.json").write_text("[1, 2]")
    refused(train_argv(prepared, tmp_path / "o", f"parallel.ds_config={tmp_path / 'ds.json'}"), capsys,
            "holds a JSON list; accepted a DeepSpeed config object")
    refused(["sweep", "--config", str(REPO / "configs" / "experiments" / "demo.yaml"), "--out", str(tmp_path / "o"),
             "--slurm", str(tmp_path / "s"), "--nodes", "0"], capsys, "--nodes = 0")
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
