"""Third hostile round, the rest: every command words its paths with megareuse/paths.py (a
directory given for a file says so, an --out under a file or that is a file is named, never a raw
errno), a sweep checks --run, domain weights and sbatch options before creating anything,
collect refuses non-numeric losses, plan refuses damaged data ranges, prepare-hf refuses empty
documents and takes an overlapping glob's file once, no warning or worker traceback comes before
the one line, and a data directory's tokenizer must be the one its prepare.json records. Each
refusal is exit 2 with one stderr line, and nothing is written."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from distributed_utils import CONFIG, REPO, base_env, tiny_args
from megareuse.cli import main
from test_bad_input import snapshot

DEMO = str(REPO / "configs" / "experiments" / "demo.yaml")
TABLE = "D1,D2,loss\n" + "".join(f"{a}e6,{b}e6,{3 + 1 / (a * b) ** 0.3:.6f}\n" for a in (1, 2, 4, 8) for b in (1, 2, 4))


def refused(argv, capsys, *expected) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(e in err[0] for e in expected), err
    assert "Errno" not in err[0], err
    return err[0]


def record(**change) -> dict:
    rec = {"schema": "megareuse-run-record/1", "run_id": "a", "series": "base", "stage": "base", "method": "base",
           "N": 10, "N_total": 20, "D1": 1000, "D2": 0, "tokens": 1000, "valid_loss": {"prose": 3.0},
           "best_valid_loss": {"prose": 2.9}, "tokens_per_domain": {"prose": 1000}, "wall_s": 1.0,
           "tokens_per_s": 1000.0, "flops": 1.0, "flops_6ND": 1.0, "out_dir": "a", "checkpoint": "a/c"}
    rec.update(change)
    return rec


@pytest.fixture(scope="module")
def fitted_law(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("law")
    (root / "runs.csv").write_text(TABLE)
    assert main(["fit", "--runs", str(root / "runs.csv"), "--form", "reuse_no_interaction",
                 "--out", str(root / "fit"), "--bootstrap", "0"]) == 0
    return root / "fit" / "law.json"


@pytest.fixture
def law_file(fitted_law, tmp_path) -> Path:
    shutil.copyfile(fitted_law, tmp_path / "law.json")
    return tmp_path / "law.json"


# ---------------------------------------------------------------- 1. paths in words
def test_a_directory_given_for_a_file_says_so(tmp_path, capsys):
    from megareuse.data import CorruptDatasetError, IndexedDataset
    (tmp_path / "d").mkdir()
    refused(["fit", "--runs", str(tmp_path / "d"), "--out", str(tmp_path / "o")], capsys,
            f"runs table '{tmp_path / 'd'}' is a directory, not a file")
    refused(["plan", "--law", str(tmp_path / "d"), "--D1", "1M", "--D2", "1M", "--out", str(tmp_path / "o")],
            capsys, f"law file '{tmp_path / 'd'}' is a directory, not a file")
    (tmp_path / "m.idx").mkdir()
    (tmp_path / "m.bin").write_bytes(b"")
    with pytest.raises(CorruptDatasetError, match=r"m\.idx is a directory, not a file"):
        IndexedDataset(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "m.bin", "m.idx"]


def test_out_that_is_a_file_or_under_one_is_named_without_errno(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    under = str(tmp_path / "f" / "sub")
    named = f"cannot be created: {tmp_path / 'f'} is a file, not a directory"
    refused(["grow", "--from", str(tmp_path / "none"), "--out", under, "--width", "2"], capsys, "--out", named)
    refused(["import-hf", "--from", str(tmp_path / "hf"), "--out", under, "--d1", "1T"], capsys, "--out", named)
    refused(["export-hf", "--from", str(tmp_path / "none"), "--out", under], capsys, "--out", named)
    refused(["fit", "--runs", str(tmp_path / "none.csv"), "--out", under], capsys, "--out", named)
    refused(["sweep", "--config", DEMO, "--out", str(tmp_path / "f")], capsys,
            f"--out '{tmp_path / 'f'}' is a file, not a directory")
    refused(["sweep", "--config", DEMO, "--out", str(tmp_path / "o"), "--slurm", str(tmp_path / "f"),
             "--gpus-per-node", "1"], capsys, f"--slurm '{tmp_path / 'f'}' is a file, not a directory")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "record.json").write_text(json.dumps(record()))
    refused(["collect", str(tmp_path / "runs"), "--out", under], capsys, f"'{tmp_path / 'f'}' is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "hf", "runs"] and (tmp_path / "f").read_text() == "x"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["a"]


def test_missing_or_file_inputs_say_what_they_are(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for src, words in ((tmp_path / "none", "does not exist"), (tmp_path / "f", "is a file, not a directory")):
        refused(["import-hf", "--from", str(src), "--out", str(tmp_path / "o"), "--d1", "1T"], capsys,
                f"--from '{src}' {words}")
        refused(["collect", str(src)], capsys, f"'{src}' {words}")
    refused(["prepare-hf", "--tokenizer", str(tmp_path / "none"), "--out", str(tmp_path / "o")], capsys,
            f"--tokenizer '{tmp_path / 'none'}' does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare is needed for a small tmpfs")
def test_grow_out_of_space_names_the_path(prepared, tmp_path):
    from megareuse.config import load_config
    from megareuse.engine.trainer import Trainer
    Trainer(load_config(CONFIG, tiny_args(prepared, tmp_path / "base", "run.train_tokens=512")[2:]),
            emit=lambda s: None).run()
    base = tmp_path / "base" / "checkpoints" / "step_00000002"
    mnt = tmp_path / "small"
    mnt.mkdir()
    out = mnt / "grown"
    script = f"mount -t tmpfs -o size=200k none {mnt} || exit 99; \"$@\"; rc=$?; ls -a {mnt} > {tmp_path}/ls.txt; exit $rc"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "megareuse.cli", "grow",
                           "--from", str(base), "--out", str(out), "--width", "2"],
                          env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode == 99:
        pytest.skip("cannot mount a tmpfs here")
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("DeepSpeed ")]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert "No space left on device (ENOSPC)" in lines[0] and str(out) in lines[0], lines
    assert (tmp_path / "ls.txt").read_text().split() == [".", ".."]  # the partial write was removed


# ---------------------------------------------------------------- 2. sweep: check before creating
def test_sweep_unknown_run_creates_nothing(tmp_path, capsys):
    refused(["sweep", "--config", DEMO, "--out", str(tmp_path / "o"), "--run", "nope"], capsys,
            "--run 'nope' is not in the plan; accepted one of")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("weight", ["0", "-1", ".nan", "'a'"])
def test_experiment_domain_weights_must_be_positive(tmp_path, capsys, weight):
    exp = Path(DEMO).read_text().replace("../train/tiny_base.yaml", CONFIG)
    assert "  domains: {prose: 1.0}\n" in exp
    (tmp_path / "exp.yaml").write_text(exp.replace("  domains: {prose: 1.0}\n", f"  domains: {{prose: {weight}}}\n", 1))
    domain = "prose"
    for extra in (["--dry-run"], []):
        refused(["sweep", "--config", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "o"), *extra], capsys,
                f"base.domains.{domain} = ", "accepted a finite number > 0")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, value, expected", [
    ("--time", "1 day", "--time = '1 day': accepted minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
    ("--time", "24:00:00:00", "--time = '24:00:00:00'"),
    ("--time", "", "--time = ''"),
    ("--partition", "gpu; rm -rf ~", "--partition = 'gpu; rm -rf ~': accepted a non-empty name"),
    ("--partition", "", "--partition = ''"),
    ("--account", "a b", "--account = 'a b'"),
])
def test_sbatch_options_are_checked(tmp_path, capsys, option, value, expected):
    refused(["sweep", "--config", DEMO, "--out", str(tmp_path / "o"), "--slurm", str(tmp_path / "s"),
             "--gpus-per-node", "1", f"{option}={value}"], capsys, expected)
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["90", "30:00", "24:00:00", "2-12", "1-00:30", "7-00:00:00"])
def test_sbatch_time_formats_accepted(value):
    from megareuse.sweep.slurm import check_sbatch_options
    check_sbatch_options(value, "gpu,debug", "proj_1")


# ---------------------------------------------------------------- 3. collect: losses are numbers
@pytest.mark.parametrize("field, value", [("valid_loss", float("nan")), ("valid_loss", "oops"),
                                          ("best_valid_loss", float("inf")), ("valid_loss", True)])
def test_collect_refuses_losses_that_are_not_finite_numbers(tmp_path, capsys, field, value):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    path = tmp_path / "runs" / "a" / "record.json"
    path.write_text(json.dumps(record(**{field: {"prose": value}})))  # json writes NaN / Infinity
    before = snapshot(tmp_path)
    refused(["collect", str(tmp_path / "runs")], capsys, str(path), f"field {field}.prose = ", "accepted a finite number")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 4. plan: data ranges
@pytest.mark.parametrize("span", [[0, 1e6], [-1, 1e6], [4e6, 1e6], "x", [float("nan"), 1e6]])
def test_plan_refuses_bad_data_ranges(law_file, tmp_path, capsys, span):
    law = json.loads(law_file.read_text())
    law["data"]["ranges"]["D1"] = span
    law_file.write_text(json.dumps(law))
    refused(["plan", "--law", str(law_file), "--out", str(tmp_path / "plan")], capsys,
            "data.ranges.D1 = ", "accepted [low, high] token counts with 0 < low <= high")
    assert not (tmp_path / "plan").exists()


# ---------------------------------------------------------------- 5. prepare-hf documents
def test_prepare_hf_refuses_empty_documents(prepared, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(["", "\n", "  \n\t"]):
        (docs / f"{i}.txt").write_text(text)
    refused(["prepare-hf", "--tokenizer", str(prepared / "tokenizer.model"), "--out", str(tmp_path / "d"),
             "--files", f"prose={docs}/*.txt", "--workers", "1"], capsys,
            "domain 'prose': all 3 documents are empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


def test_prepare_hf_takes_a_file_matched_twice_once(prepared, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text(f"document number {i} with some words\n" * 20)
    assert main(["prepare-hf", "--tokenizer", str(prepared / "tokenizer.model"), "--out", str(tmp_path / "d"),
                 "--files", f"prose={docs}/*.txt", "--files", f"prose={docs}/[01].txt", "--workers", "1"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 of its 2 files were already matched for domain 'prose'" in err[0], err
    assert json.loads((tmp_path / "d" / "prepare.json").read_text())["domains"]["prose"]["source_files"] == 4


# ---------------------------------------------------------------- 7. nothing before the one line
def test_a_huge_log_coefficient_is_inf_without_a_warning():
    from megareuse.law.forms import get_form
    form = get_form("reuse_no_interaction")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params = form.params_from_theta([1e308] * form.n_params)
    assert any(math.isinf(v) for v in params.values())


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_ctrl_c_in_fit_with_workers_is_one_line(tmp_path):
    (tmp_path / "runs.csv").write_text(TABLE)
    proc = subprocess.Popen([sys.executable, "-m", "megareuse.cli", "fit", "--runs", str(tmp_path / "runs.csv"),
                             "--form", "reuse_no_interaction", "--bootstrap", "200000", "--workers", "2",
                             "--out", str(tmp_path / "fit")], env=base_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_children(proc.pid)) < 2 and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted (SIGINT)" in lines[0], (proc.returncode, err[-3000:])
    assert not (tmp_path / "fit").exists()


# ---------------------------------------------------------------- 8. the tokenizer prepare.json records
def test_tokenizer_that_is_not_the_prepared_one_is_refused(prepared, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    info = json.loads((data / "prepare.json").read_text())
    info["tokenizer_sha256"] = "0" * 64
    (data / "prepare.json").write_text(json.dumps(info))
    out = tmp_path / "out"
    refused(["train", *tiny_args(data, out, "run.train_tokens=512")], capsys,
            str(data / "tokenizer.model"), str(data / "prepare.json"), "records tokenizer_sha256 000000000000")
    assert not out.exists()
