"""`megareuse prepare --tokenizer` with byte-level BPE tokenizer.json files laid out as Llama 3 and
Qwen2/2.5/3 ship them, built here with the `tokenizers` library (nothing is downloaded).

The reference is transformers' own tokenizer of the same files: ``PreTrainedTokenizerFast`` with
``split_special_tokens=True`` (special-token text in a document is text) and no special tokens
added, plus the EOS id ``AutoTokenizer`` reads, compared with the .bin/.idx prepare writes; each
prepared document, minus its EOS, decodes (``tokenizers``' decoder) to its source exactly."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from megareuse.cli import main
from megareuse.data import IndexedDataset, PrepareError, prepare
from megareuse.data.hf_tokenizer import JsonTokenizer
from megareuse.data.preprocess import SPLITS, domain_prefix

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import (AddedToken, Regex, decoders, models, normalizers, pre_tokenizers,  # noqa: E402
                        processors, trainers)

# the pre-tokenizer regexes of Llama 3's and Qwen2's tokenizer.json (digits: 1-3 vs one at a time)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",  # Llama 3.1's order
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_PLAIN = ["<tool_call>", "</tool_call>"]  # added tokens that are not special in Qwen2.5
FAMILIES = {
    "llama3": {"special": LLAMA3_SPECIAL, "plain": [],
               "config": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True,
                          "clean_up_tokenization_spaces": True, "model_max_length": 131072,
                          "tokenizer_class": "PreTrainedTokenizerFast"}},
    "qwen2": {"special": QWEN2_SPECIAL, "plain": QWEN2_PLAIN,
              "config": {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                         "errors": "replace", "split_special_tokens": False, "model_max_length": 131072,
                         "tokenizer_class": "PreTrainedTokenizerFast"}},
}
CODE = '''import os


class Cache:
    """A tiny cache."""

    def __init__(self, size: int = 128) -> None:
        self.size = size  # trailing spaces follow   
        self.items: dict[str, bytes] = {}

    def get(self, key):
\tif key in self.items:
\t\treturn self.items[key]
        return None
'''
TRAIN_TEXT = [
    "The quick brown fox doesn't jump; it's lazy, they'll say. We've 1234567 apples and 3.14159 pies.\n",
    "Größe, naïve café, déjà vu. 東京は晴れです。 Привет, мир! مرحبا بالعالم\n",
    CODE,
    "Emoji: 🙂 👍🏽 👨‍👩‍👧 🚀\n\n  two leading spaces,\ttab,   three spaces.\r\nCRLF line\r\n",
]
DOCUMENTS = TRAIN_TEXT + [
    "Literal specials: <|endoftext|> and <|begin_of_text|>x<|end_of_text|> end.",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n<|eot_id|>",
    "<|endoftext|>",
    "<tool_call>{\"name\": \"f\", \"args\": [1, 2]}</tool_call>\n",
    " a leading space, unseen letters 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ ℵ₀ ꙮ and a trailing newline\n\n",
    "\n\n\tindented after blank lines\n" + CODE.replace("    ", "\t"),
    Path(json.__file__).read_text(encoding="utf-8"),  # 14 KB of local code the tokenizer never saw
]
assert all(unicodedata.is_normalized("NFC", d) for d in DOCUMENTS)  # Qwen's NFC normalizer keeps them


def build_tokenizer(out: Path, family: str) -> Path:
    """A tokenizer.json + tokenizer_config.json of ``family``'s layout: BPE over the 256 byte
    symbols trained on TRAIN_TEXT, the family's Split regex + ByteLevel(use_regex=False)
    pre-tokenizer, ByteLevel decoder, added tokens after the BPE vocabulary."""
    spec = FAMILIES[family]
    tok = tokenizers.Tokenizer(models.BPE())
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    pattern = LLAMA3_SPLIT if family == "llama3" else QWEN2_SPLIT
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAIN_TEXT * 4, trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["special"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["plain"]])
    byte_level = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if family == "llama3":
        tok.model.ignore_merges = True
        bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
        tok.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]}:1 $B:1", special_tokens=[bos])])
    else:
        tok.post_processor = byte_level
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(spec["config"], indent=2))
    return out / "tokenizer.json"


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    return path


def prepared_documents(out: Path, domain: str) -> list[list[int]]:
    """Every document of both splits, read back with IndexedDataset."""
    docs = []
    for split in SPLITS:
        ds = IndexedDataset(domain_prefix(out, domain, split))
        docs += [ds.document(i).tolist() for i in range(ds.num_documents)]
    return docs


def reference(tokenizer_dir: Path):
    """transformers' tokenizer of the files: special-token text split as text."""
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                                split_special_tokens=True)


def special_ids(tokenizer_dir: Path) -> set[int]:
    raw = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    return {t["id"] for t in raw["added_tokens"] if t["special"]}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def prepared(request, tmp_path_factory):
    """(family, tokenizer directory, prepare.json, prepared documents) of one family's tokenizer."""
    root = tmp_path_factory.mktemp(request.param)
    build_tokenizer(root / "model", request.param)
    info = prepare(root / "data", {"web": str(write_jsonl(root / "docs.jsonl", DOCUMENTS))},
                   tokenizer=root / "model", valid=2, workers=2, progress=False)
    return request.param, root / "model", info, prepared_documents(root / "data", "web")


def test_prepared_ids_are_transformers_encode_plus_eos(prepared):
    family, model, info, docs = prepared
    ref, auto = reference(model), transformers.AutoTokenizer.from_pretrained(str(model))
    eos = auto.eos_token_id
    expected = [ref.encode(d, add_special_tokens=False) + [eos] for d in DOCUMENTS]
    assert sorted(docs) == sorted(expected)
    assert info["eos_id"] == eos and info["tokenizer"] == "tokenizer.json"
    assert info["vocab_size"] == len(ref) == ref.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    assert info["dtype"] == "uint16"
    for key in ("bos", "pad"):
        want = getattr(auto, f"{key}_token_id")
        assert info[f"{key}_id"] == (-1 if want is None else want), key


def test_documents_round_trip_exactly(prepared):
    family, model, info, docs = prepared
    decoder = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json"))
    ours = JsonTokenizer(model / "tokenizer.json")
    assert all(d[-1] == info["eos_id"] for d in docs)
    decoded = [decoder.decode(d[:-1], skip_special_tokens=False) for d in docs]
    assert sorted(decoded) == sorted(DOCUMENTS)
    assert [ours.decode(d[:-1]) for d in docs] == decoded


def test_special_token_text_in_documents_stays_text(prepared):
    family, model, info, docs = prepared
    special = special_ids(model)
    plain = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json"))
    literal = "<|endoftext|>" if family == "qwen2" else "<|end_of_text|>"
    # what the tokenizers library does by default: the literal text becomes the EOS id
    assert info["eos_id"] in plain.encode(f"a {literal} b", add_special_tokens=False).ids
    assert all(not special & set(d[:-1]) for d in docs), "a special id inside a document"
    assert JsonTokenizer(model / "tokenizer.json").encode(f"a {literal} b") == \
        reference(model).encode(f"a {literal} b", add_special_tokens=False)


def test_no_bos_is_added(prepared):
    family, model, info, docs = prepared
    with_specials = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json")).encode("Hello").ids
    if family == "llama3":  # its TemplateProcessing post-processor prepends BOS by default
        assert info["bos_id"] >= 0 and with_specials[0] == info["bos_id"]
    else:
        assert info["bos_id"] == -1
    assert all(d[0] != info["bos_id"] for d in docs)
    ours = JsonTokenizer(model / "tokenizer.json").encode("Hello")
    assert ours == reference(model).encode("Hello", add_special_tokens=False)


def test_instruct_eos_is_tokenizer_configs_not_config_jsons(tmp_path):
    """A Llama 3.1 Instruct layout: tokenizer_config.json eos_token <|eot_id|>; config.json and
    generation_config.json list three stop ids, <|end_of_text|> first. EOS is what AutoTokenizer
    reads (tokenizer_config.json); prepare copies tokenizer_config.json beside tokenizer.json."""
    model = tmp_path / "llama-3.1-instruct"
    vocab = tokenizers.Tokenizer.from_file(str(build_tokenizer(model, "llama3")))
    stops = [vocab.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|eot_id|>"}))
    ids = {"bos_token_id": vocab.token_to_id("<|begin_of_text|>"), "eos_token_id": stops}
    (model / "config.json").write_text(json.dumps({"model_type": "llama", **ids}))
    (model / "generation_config.json").write_text(json.dumps(ids))
    want = transformers.AutoTokenizer.from_pretrained(str(model)).eos_token_id
    out = tmp_path / "data"
    assert main(["prepare", "--input", f"chat={write_jsonl(tmp_path / 'd.jsonl', DOCUMENTS)}", "--tokenizer",
                 str(model), "--valid-docs", "1", "--out", str(out), "--workers", "1"]) == 0
    info = json.loads((out / "prepare.json").read_text())
    assert info["eos_id"] == want != stops[0]
    assert all(d[-1] == want and want not in d[:-1] for d in prepared_documents(out, "chat"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (model / name).read_bytes()
    assert JsonTokenizer(out / "tokenizer.json").eos_id == want  # the copy says the same


def test_without_tokenizer_config_eos_is_a_known_end_of_text_token(tmp_path):
    for family, name in (("llama3", "<|end_of_text|>"), ("qwen2", "<|endoftext|>")):
        path = build_tokenizer(tmp_path / family, family)
        (tmp_path / family / "tokenizer_config.json").unlink()
        tok = JsonTokenizer(path)
        assert tok.eos_id == tokenizers.Tokenizer.from_file(str(path)).token_to_id(name)
        assert tok.bos_id == tok.pad_id == -1


@pytest.mark.parametrize("config, message", [
    ({"eos_token": "<|nope|>"}, "field eos_token = '<|nope|>' is not in the vocabulary; accepted a token"),
    ({"eos_token": 151643}, "field eos_token = 151643; accepted a token string"),
    ({"eos_token": "<|endoftext|>", "bos_token": ["<s>"]}, "field bos_token = ['<s>']; accepted a token string"),
    (None, "no end-of-text token (no tokenizer_config.json field eos_token"),
])
def test_unusable_special_tokens_are_refused_in_one_line(tmp_path, config, message):
    model = tmp_path / "model"
    build_tokenizer(model, "qwen2")
    if config is None:  # no tokenizer_config.json and no known end-of-text token in the vocabulary
        (model / "tokenizer_config.json").unlink()
        raw = json.loads((model / "tokenizer.json").read_text())
        raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<|endoftext|>"
                               and t["content"] != "<|im_end|>"]
        (model / "tokenizer.json").write_text(json.dumps(raw))
    else:
        (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(PrepareError) as err:
        prepare(tmp_path / "out", {"web": str(write_jsonl(tmp_path / "d.jsonl", DOCUMENTS))}, tokenizer=model,
                progress=False)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
