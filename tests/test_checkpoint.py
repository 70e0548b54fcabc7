import json
import os

import pytest
import torch

from megareuse.engine import checkpoint as ckpt


def save(root, step, value=1.0, keep_last=None):
    return ckpt.save_checkpoint(root, step, {"model": {"w": torch.full((4,), value)}},
                                {"D1": step * 10}, keep_last=keep_last)


def test_save_load_roundtrip_with_manifest(tmp_path):
    path = save(tmp_path, 3, 2.5)
    assert path.name == "step_00000003"
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert set(manifest) == {"model.pt", "meta.json"}
    assert manifest["model.pt"]["bytes"] == (path / "model.pt").stat().st_size
    objs, meta = ckpt.load_checkpoint(path)
    assert torch.equal(objs["model"]["w"], torch.full((4,), 2.5))
    assert meta["D1"] == 30 and meta["step"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_half_written_checkpoints_are_ignored(tmp_path):
    good = save(tmp_path, 1)
    # a crash before the rename leaves a temp dir; a crash mid-copy leaves no manifest
    (tmp_path / ".tmp-step_00000002-123").mkdir()
    (tmp_path / ".tmp-step_00000002-123" / "model.pt").write_bytes(b"partial")
    broken = tmp_path / "step_00000003"
    broken.mkdir()
    (broken / "model.pt").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="step_00000003: no manifest.json"):
        assert ckpt.latest_checkpoint(tmp_path) == good


def test_truncated_and_flipped_files_detected(tmp_path):
    first = save(tmp_path, 1)
    second = save(tmp_path, 2)
    data = bytearray((second / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (second / "model.pt").write_bytes(bytes(data))
    assert "sha256" in ckpt.verify_checkpoint(second)
    with pytest.warns(UserWarning, match="step_00000002"):
        assert ckpt.latest_checkpoint(tmp_path) == first
    with open(first / "model.pt", "r+b") as fh:
        fh.truncate(10)
    assert "bytes" in ckpt.verify_checkpoint(first)
    with pytest.raises(ckpt.CheckpointError, match="not usable"):
        ckpt.load_checkpoint(first)


def test_keep_last_retention(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in ckpt.step_dirs(tmp_path) if ckpt.verify_checkpoint(p) is None] == ["step_00000004", "step_00000005"]


def test_resave_same_step_replaces(tmp_path):
    save(tmp_path, 7, 1.0)
    path = save(tmp_path, 7, 9.0)
    objs, _ = ckpt.load_checkpoint(path)
    assert objs["model"]["w"][0] == 9.0
    assert sorted(os.listdir(tmp_path)) == ["step_00000007"]


def test_git_revision_is_the_code_the_process_imported(tmp_path):
    """A commit made in the checkout after the trainer was imported (a sweep worker runs for many
    minutes) does not relabel the checkpoints this process writes."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = tmp_path / "checkout"
    shutil.copytree(Path(__file__).resolve().parents[1] / "megareuse", repo / "megareuse",
                    ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "first"]):
        subprocess.run(git + cmd, cwd=repo, check=True, capture_output=True, timeout=60)
    first = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                           check=True).stdout.strip()
    script = ("import subprocess, sys\n"
              "import megareuse.engine.trainer\n"
              "from megareuse.engine import checkpoint\n"
              "assert checkpoint.__file__.startswith(sys.argv[1]), checkpoint.__file__\n"
              f"subprocess.run({git + ['commit', '-q', '--allow-empty', '-m', 'second']!r}, cwd=sys.argv[1], check=True)\n"
              "print(checkpoint.git_revision())\n")
    proc = subprocess.run([sys.executable, "-c", script, str(repo)], capture_output=True, text=True, timeout=300, cwd=repo,
                          env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == first
