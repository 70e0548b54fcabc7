"""`megareuse prepare` on a user's own corpus: every input format against the tokenizer's own
encode (read back through an independent reader of Megatron's .bin/.idx), order and determinism
under workers, the validation split, dotted domains, bad records, the streaming memory bound."""
from __future__ import annotations

import gzip
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megareuse.cli import main
from megareuse.data import IndexedDatasetBuilder, PrepareError, Tokenizer, prepare, train_tokenizer

STDLIB = Path(json.__file__).parent.parent


def megatron_documents(prefix) -> list[list[int]]:
    """Each document's ids, read from the raw bytes of <prefix>.idx/.bin (not IndexedDataset)."""
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    code = raw[17]
    n_seq, n_doc = np.frombuffer(raw, "<u8", 2, 18)
    sizes = np.frombuffer(raw, "<i4", int(n_seq), 34)
    pointers = np.frombuffer(raw, "<i8", int(n_seq), 34 + 4 * int(n_seq))
    docs = np.frombuffer(raw, "<i8", int(n_doc), 34 + 12 * int(n_seq))
    dtype = {8: np.dtype("<u2"), 4: np.dtype("<i4")}[code]
    data = Path(f"{prefix}.bin").read_bytes()
    seqs = [np.frombuffer(data, dtype, int(s), int(p)).tolist() for s, p in zip(sizes, pointers)]
    return [sum(seqs[docs[i]:docs[i + 1]], []) for i in range(len(docs) - 1)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Distinct real documents: stdlib sources, one with non-ASCII text and U+2581."""
    files = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))[:12]
    docs = [p.read_text() for p in files]
    docs[3] = "caf\u00e9 \u4e2d\u6587 \U0001f600 \u2581 tab\there\n" + docs[3]
    return docs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, texts) -> Tokenizer:
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tok", 600, seed=1)


def write_inputs(root: Path, fmt: str, docs: list[str]) -> str:
    """``docs`` written in ``fmt`` under ``root`` (two shards where the format has records);
    returns the path or glob naming them."""
    root.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    shards = [docs[:half], docs[half:]]
    if fmt == "text":
        for i, d in enumerate(docs):
            (root / f"{i:03d}.txt").write_bytes(d.encode())
        return str(root / "*.txt")
    if fmt == "lines":
        lines = [" ".join(d.split()) for d in docs]
        (root / "a.txt").write_text("\n\n".join(lines[:half]) + "\n")  # blank lines between
        (root / "b.txt").write_text("\n".join(lines[half:]))  # no final newline
        return str(root / "*.txt")
    records = [[json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(s)] for s in shards]
    if fmt == "jsonl":
        for i, r in enumerate(records):
            (root / f"s{i}.jsonl").write_text("".join(r))
        return str(root / "s*.jsonl")
    if fmt == "jsonl.gz":
        for i, r in enumerate(records):
            with gzip.open(root / f"s{i}.jsonl.gz", "wt") as fh:
                fh.write("".join(r))
        return str(root / "*.jsonl.gz")
    if fmt == "jsonl.zst":
        zstd = pytest.importorskip("zstandard")
        for i, r in enumerate(records):
            (root / f"s{i}.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress("".join(r).encode()))
        return str(root / "*.jsonl.zst")
    if fmt == "parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        for i, s in enumerate(shards):
            pq.write_table(pa.table({"id": list(range(len(s))), "text": s}), root / f"s{i}.parquet",
                           row_group_size=3)
        return str(root / "*.parquet")
    if fmt == "hf":
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "ds"), max_shard_size="20KB")
        return str(root / "ds")
    raise AssertionError(fmt)


def expected_docs(fmt: str, docs: list[str]) -> list[str]:
    return [" ".join(d.split()) for d in docs] if fmt == "lines" else docs


def assert_split(reference: list[list[int]], train: list[list[int]], valid: list[list[int]]) -> None:
    """train and valid partition ``reference`` (distinct documents), each in input order."""
    assert sorted(train + valid) == sorted(reference)
    position = {tuple(d): i for i, d in enumerate(reference)}
    for part in (train, valid):
        order = [position[tuple(d)] for d in part]
        assert order == sorted(order)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf", "text", "lines"])
def test_each_format_is_the_tokenizers_encode_plus_eos(tmp_path, texts, tokenizer, fmt):
    pattern = write_inputs(tmp_path / "in", fmt, texts)
    info = prepare(tmp_path / "out", {"web": [pattern]}, tokenizer=tokenizer.path, workers=2, valid=0.2,
                   split="lines" if fmt == "lines" else "file", progress=False)
    reference = [tokenizer.encode(t) + [tokenizer.eos_id] for t in expected_docs(fmt, texts)]
    train = megatron_documents(tmp_path / "out" / "web_train")
    valid = megatron_documents(tmp_path / "out" / "web_valid")
    assert_split(reference, train, valid)
    assert len(valid) >= 1 and len(train) >= 1
    web = info["domains"]["web"]
    assert web["train"]["documents"] == len(train) and web["valid"]["tokens"] == sum(map(len, valid))
    assert web["empty_documents_skipped"] == 0 and web["bad_records_skipped"] == 0
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
def test_workers_do_not_change_a_byte(tmp_path, texts, tokenizer, monkeypatch, fmt):
    from megareuse.data import sources
    monkeypatch.setattr(sources, "CHUNK_BYTES", 20_000)  # ~10 chunks per shard: many in flight
    pattern = write_inputs(tmp_path / "in", fmt, texts)
    outs = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        prepare(out, {"web": pattern}, tokenizer=tokenizer.path, workers=workers, valid=0.1, progress=False)
        outs.append({p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith(".ids.json")})
    assert outs[0] == outs[1]
    reference = [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    assert_split(reference, megatron_documents(out / "web_train"), megatron_documents(out / "web_valid"))


def test_valid_docs_is_exact_seeded_and_in_order(tmp_path, texts, tokenizer):
    pattern = write_inputs(tmp_path / "in", "jsonl", texts)
    reference = [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    picked = []
    for seed in (1, 1, 2):
        out = tmp_path / f"s{len(picked)}"
        info = prepare(out, {"web": pattern}, tokenizer=tokenizer.path, valid=4, seed=seed, progress=False)
        valid = megatron_documents(out / "web_valid")
        assert_split(reference, megatron_documents(out / "web_train"), valid)
        assert len(valid) == 4 and len(info["domains"]["web"]["valid_sources"]) == 4
        picked.append(valid)
    assert picked[0] == picked[1] and picked[0] != picked[2]
    with pytest.raises(PrepareError, match=f"has {len(texts)} records; {len(texts)} validation"):
        prepare(tmp_path / "x", {"web": pattern}, tokenizer=tokenizer.path, valid=len(texts), progress=False)
    assert not (tmp_path / "x").exists()


def test_new_tokenizer_from_jsonl_and_a_dotted_domain(tmp_path, texts):
    pattern = write_inputs(tmp_path / "in", "jsonl.gz", texts)
    info = prepare(tmp_path / "out", {"wiki.en": pattern}, vocab_size=500, valid=2, progress=False)
    tok = Tokenizer(tmp_path / "out" / "tokenizer.model")
    assert info["tokenizer_trained"] and tok.vocab_size == 500 and info["tokenizer_sample_bytes"] > 0
    reference = [tok.encode(t) + [tok.eos_id] for t in texts]
    assert_split(reference, megatron_documents(tmp_path / "out" / "wiki.en_train"),
                 megatron_documents(tmp_path / "out" / "wiki.en_valid"))


def test_empty_documents_are_skipped_and_counted(tmp_path, texts, tokenizer):
    (tmp_path / "in").mkdir()
    lines = [{"text": texts[0]}, {"text": ""}, {"text": "  \n"}, {"text": texts[1]}, {"text": texts[2]}]
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n\n")
    info = prepare(tmp_path / "out", {"web": str(tmp_path / "in" / "a.jsonl")}, tokenizer=tokenizer.path,
                   valid=1, progress=False)
    web = info["domains"]["web"]
    assert web["empty_documents_skipped"] == 2
    assert web["train"]["documents"] + web["valid"]["documents"] == 3


BAD_RECORDS = [
    (b'{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n', "a.jsonl:3: not a JSON line"),
    (b'{"text": "fine"}\n{"body": "no text key"}\n', "a.jsonl:2: no 'text' key (keys: body)"),
    (b'{"text": "fine"}\n{"text": 7}\n', "a.jsonl:2: 'text' is a JSON int, not a string"),
    (b'{"text": "fine"}\n["a list"]\n', "a.jsonl:2: a JSON list, not an object"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "a.jsonl:2: not valid UTF-8"),
    (b'{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n', "a.jsonl:2: not valid UTF-8 text (a lone surrogate"),
]


@pytest.mark.parametrize("content, message", BAD_RECORDS)
def test_bad_records_name_file_and_line_and_leave_nothing(tmp_path, tokenizer, content, message):
    (tmp_path / "in").mkdir()
    good = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(4)).encode()
    (tmp_path / "in" / "a.jsonl").write_bytes(content + good)
    args = dict(tokenizer=tokenizer.path, valid=1, progress=False, workers=2)
    with pytest.raises(PrepareError, match="^prepare: .*" + re.escape(message)):
        prepare(tmp_path / "out", {"web": str(tmp_path / "in" / "a.jsonl")}, **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no staging directory
    info = prepare(tmp_path / "out", {"web": str(tmp_path / "in" / "a.jsonl")}, skip_bad=True, **args)
    web = info["domains"]["web"]
    assert web["bad_records_skipped"] == 1 and message.split(": ", 1)[1] in web["bad_examples"][0]
    assert web["train"]["documents"] + web["valid"]["documents"] == content.count(b"\n") - 1 + 4


def test_bad_tables_and_archives_are_one_line(tmp_path, tokenizer, texts):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": texts}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": list(range(len(texts)))}), tmp_path / "n.parquet")
    packed = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    (tmp_path / "t.jsonl.gz").write_bytes(packed[: len(packed) // 2])  # truncated
    (tmp_path / "x.parquet").write_text("not parquet")
    cases = [("a.parquet", r"a\.parquet has no column 'text' \(columns: content\)"),
             ("n.parquet", r"n\.parquet: column 'text' is int64, not a string column"),
             ("t.jsonl.gz", r"t\.jsonl\.gz: cannot decompress after line"),
             ("x.parquet", r"x\.parquet is not a parquet file")]
    for name, message in cases:
        with pytest.raises(PrepareError, match=message):
            prepare(tmp_path / "out", {"web": str(tmp_path / name)}, tokenizer=tokenizer.path, progress=False)
        assert not (tmp_path / "out").exists()


def test_cli_prepares_a_users_corpus(tmp_path, texts, tokenizer, capsys):
    pattern = write_inputs(tmp_path / "in", "jsonl", texts)
    out = tmp_path / "data"
    assert main(["prepare", "--input", f"web.en={pattern}", "--tokenizer", str(tokenizer.path),
                 "--valid-docs", "3", "--out", str(out), "--workers", "1"]) == 0
    said = capsys.readouterr().out
    assert f"web.en: {len(texts) - 3} train documents" in said and "3 valid" in said
    assert json.loads((out / "prepare.json").read_text())["domains"]["web.en"]["formats"] == ["jsonl"]
    for argv, message in [
        (["--input", "web"], "--input 'web': accepted DOMAIN=PATH_OR_GLOB"),
        (["--input", f"web={tmp_path}/none*.jsonl"], "matches no file"),
        (["--input", f"web={pattern}", "--domains", "prose"], "--domains (built-in corpora) and --input"),
        (["--input", f"web={pattern}", "--valid-docs", "2", "--valid-fraction", "0.1"], "--valid-docs and --valid-fraction"),
        (["--input", f"web={tmp_path / 'in'}"], "is a directory; accepted a file, a glob"),
        (["--input", f"web={pattern}", "--tokenizer", str(tmp_path / "nope.json")], "nope.json"),
        (["--input", f"bad/name={pattern}"], "domain name 'bad/name'"),
    ]:
        assert main(["prepare", "--out", str(tmp_path / "o2"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
        assert not (tmp_path / "o2").exists()


def test_builder_bulk_and_spilled_index_match_per_document_writes(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, rng.integers(0, 40)).astype(np.uint16) for _ in range(700)]
    with IndexedDatasetBuilder(tmp_path / "one", np.uint16) as b:
        for d in docs:
            b.add_document(d)
        b.finalize()
    monkeypatch.setattr(IndexedDatasetBuilder, "BLOCK", 64)  # many side-file blocks
    with IndexedDatasetBuilder(tmp_path / "bulk", np.uint16) as b:
        for start in range(0, len(docs), 97):
            part = docs[start:start + 97]
            b.add_documents(np.concatenate(part), np.array([d.size for d in part]))
        b.finalize()
    for ext in ("bin", "idx"):
        assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"bulk.{ext}").read_bytes()
    assert megatron_documents(tmp_path / "bulk") == [d.tolist() for d in docs]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}.{e}" for n in ("one", "bulk") for e in ("bin", "idx", "ids.json"))  # no side files left


# --------------------------------------------------------------------------- memory bound
def _generate_jsonl(path: Path, megabytes: int) -> None:
    """Distinct documents of varied words, written in blocks."""
    rng = random.Random(0)
    words = (STDLIB / "textwrap.py").read_text().split()
    with open(path, "w") as fh:
        written = 0
        while written < megabytes << 20:
            block = "".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(50, 400)))}) + "\n"
                            for _ in range(2000))
            fh.write(block)
            written += len(block)


def _peak_rss_mib(argv: list[str]) -> float:
    """The largest peak RSS of any process of the command (run under a wrapper, whose only children
    are the command and, through it, its workers)."""
    wrapper = textwrap.dedent(f"""
        import resource, subprocess, sys
        subprocess.run({argv!r}, check=True, stdout=subprocess.DEVNULL)
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    """)
    out = subprocess.run([sys.executable, "-c", wrapper], check=True, capture_output=True, text=True, timeout=600)
    return int(out.stdout.split()[-1]) / 1024


def _memory_case(tmp_path, tokenizer, sizes_mb):
    peaks = []
    for mb in sizes_mb:
        corpus = tmp_path / f"c{mb}.jsonl"
        _generate_jsonl(corpus, mb)
        out = tmp_path / f"out{mb}"
        peaks.append(_peak_rss_mib([sys.executable, "-m", "megareuse.cli", "prepare", "--input", f"gen={corpus}",
                                    "--tokenizer", str(tokenizer.path), "--out", str(out), "--workers", "2"]))
        assert json.loads((out / "prepare.json").read_text())["domains"]["gen"]["train"]["tokens"] > mb * 100_000
        corpus.unlink()
    return peaks


def test_memory_does_not_grow_with_the_corpus(tmp_path, tokenizer):
    small, large = _memory_case(tmp_path, tokenizer, (4, 40))
    assert large < 150, f"peak RSS {large:.0f} MiB for a 40 MB corpus"
    assert large - small < 15, f"peak RSS grew from {small:.0f} to {large:.0f} MiB with the corpus (4 -> 40 MB)"


@pytest.mark.slow
def test_memory_bound_on_a_few_hundred_megabytes(tmp_path, tokenizer):
    small, large = _memory_case(tmp_path, tokenizer, (10, 300))
    assert large < 200 and large - small < 20, (small, large)
