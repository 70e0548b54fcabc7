"""Bad inputs (issue #30 item 4): an empty --domains is refused, not read as the default;
evaluate reads only the validation splits; no reader writes into its input data (the token id
range a reader scans is cached per user, outside the data directory)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from distributed_utils import CONFIG, tiny_args
from megareuse.cli import main
from megareuse.data import IndexedDataset, IndexedDatasetBuilder
from megareuse.data.indexed import cache_dir, cached_ids_path
from test_bad_input import snapshot
from test_env_failures import FAST, copy_data, refused, train_argv


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    """A 2-step tiny base run's checkpoint."""
    from megareuse.config import load_config
    from megareuse.engine.trainer import Trainer
    root = tmp_path_factory.mktemp("defects")
    Trainer(load_config(CONFIG, tiny_args(prepared, root, *FAST)[2:]), emit=lambda s: None).run()
    return root / "checkpoints" / "step_00000002"


@pytest.fixture
def scans(monkeypatch, tmp_path):
    """The prefixes whose token range was scanned (not read from a cache), with the per-user
    cache in tmp_path/cache."""
    monkeypatch.setenv("MEGAREUSE_CACHE_DIR", str(tmp_path / "cache"))
    scanned = []
    scan = IndexedDataset._scan

    def counted(self, chunk):
        scanned.append(self.prefix.name)
        return scan(self, chunk)
    monkeypatch.setattr(IndexedDataset, "_scan", counted)
    return scanned


def evaluate_argv(checkpoint, data, domains="prose"):
    return ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--domains", domains,
            "--tokens", "64"]


def open_for_training(data):
    from megareuse.config import load_config
    from megareuse.engine.inputs import open_training_data
    cfg = load_config(CONFIG, tiny_args(data, data.parent / "run")[2:])
    return open_training_data(cfg.data, cfg.model)


@pytest.mark.parametrize("value", ["", "prose,,code", ",code", "prose, "])
def test_empty_domains_are_refused_not_defaulted(checkpoint, tmp_path, capsys, value):
    expected = f"--domains = {value!r}: accepted a comma-separated list of domain names, e.g. prose,code"
    line = refused(["evaluate", "--checkpoint", str(checkpoint), "--domains", value], capsys, expected)
    assert line.startswith("megareuse evaluate: config error: --domains")
    line = refused(["prepare", "--out", str(tmp_path / "out"), "--domains", value], capsys, expected)
    assert line.startswith("megareuse prepare: --domains")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_reads_only_the_valid_split(prepared, checkpoint, tmp_path, capsys, scans):
    data = copy_data(prepared, tmp_path / "data")
    tokens = np.memmap(data / "prose_train.bin", dtype=np.uint16, mode="r+")
    tokens[17] = 600  # same size, valid index: only the ids are wrong (the tokenizer has 512)
    tokens.flush()
    del tokens
    (data / "prose_train.ids.json").unlink()  # the builder's record no longer holds
    assert main(evaluate_argv(checkpoint, data)) == 0
    losses = json.loads(capsys.readouterr().out)
    assert list(losses) == ["prose"] and np.isfinite(losses["prose"])
    assert scans == []  # the valid split's range came from the builder's record
    lo = int(np.min(IndexedDataset(data / "prose_train").tokens))
    line = refused(train_argv(data, tmp_path / "o"), capsys, f"prose_train.bin holds token ids {lo}..600")
    assert "data.train.prose" in line and "has 512 (accepted ids 0..511)" in line
    assert not (tmp_path / "o").exists()


def test_readers_cache_the_token_range_outside_their_data(prepared, checkpoint, tmp_path, capsys, scans):
    data = copy_data(prepared, tmp_path / "data")
    for record in data.glob("*.ids.json"):
        record.unlink()  # as for data written by Megatron-LM: every reader has to scan
    before = snapshot(data)
    assert main(evaluate_argv(checkpoint, data)) == 0
    assert snapshot(data) == before  # nothing written into the data directory, nothing touched
    assert scans == ["prose_valid"]
    assert [p.name for p in (tmp_path / "cache" / "token-ranges").iterdir()] == [
        cached_ids_path(data / "prose_valid").name]
    open_for_training(data)
    assert sorted(scans) == ["code_valid", "prose_train", "prose_valid"]  # prose_valid from the cache
    open_for_training(data)
    assert main(evaluate_argv(checkpoint, data, "prose,code")) == 0
    assert len(scans) == 3  # later readers read the cache
    assert snapshot(data) == before


def test_unwritable_cache_means_scanning_again(tmp_path, monkeypatch, scans):
    with IndexedDatasetBuilder(tmp_path / "data" / "x") as builder:
        builder.add_document([3, 9, 4])
        builder.finalize()
    (tmp_path / "data" / "x.ids.json").unlink()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MEGAREUSE_CACHE_DIR", str(tmp_path / "file"))  # a file: no cache below it
    assert [IndexedDataset(tmp_path / "data" / "x").token_range() for _ in range(2)] == [(3, 9)] * 2
    assert scans == ["x", "x"] and sorted(p.name for p in (tmp_path / "data").iterdir()) == ["x.bin", "x.idx"]


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAREUSE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("MEGAREUSE_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "megareuse"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "megareuse"
