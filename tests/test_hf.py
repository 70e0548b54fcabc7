"""Hugging Face interop (megareuse.interop): import-hf / export-hf round trips checked against
transformers' own LlamaForCausalLM logits, grown-model export, unsupported-field errors, and data
preparation with an imported tokenizer feeding stage 2. Everything is built locally: no downloads."""
import json
import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers", reason="transformers is a test/extra dependency (pip install -e .[hf])")
pytest.importorskip("safetensors", reason="HF interop needs safetensors")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from megareuse.cli import main  # noqa: E402
from megareuse.config import Config, apply_overrides, load_config  # noqa: E402
from megareuse.data import IndexedDataset, Tokenizer, train_tokenizer  # noqa: E402
from megareuse.engine import checkpoint as ckpt  # noqa: E402
from megareuse.engine.weights import load_state_dict  # noqa: E402
from megareuse.interop.hf import HFError, export_hf, import_hf, model_config_from_hf  # noqa: E402
from megareuse.interop.hf_data import JsonTokenizer, prepare_with_tokenizer  # noqa: E402
from megareuse.model import GPT  # noqa: E402

TOL = 1e-5
VOCAB = 544  # model vocabulary (the tokenizer has 512 pieces: padded, as real models often are)
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = ["textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A small sentencepiece model trained locally (stands in for a base model's tokenizer)."""
    prefix = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer([STDLIB / name for name in TEXTS], prefix, 512).path


def make_hf(root: Path, sp_model: Path, kv: int, tied: bool, shard=None, seed=0):
    """A random LlamaForCausalLM saved with save_pretrained (+ tokenizer.model); returns
    (dir, model). Norm gains are randomised too, so a misplaced norm would show."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv, rope_theta=50000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=tied, max_position_embeddings=64,
                         attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    model.save_pretrained(root, **({"max_shard_size": shard} if shard else {}))
    shutil.copyfile(sp_model, root / "tokenizer.model")
    return root, model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def ours_logits(path: Path, tokens):
    assert ckpt.verify_checkpoint(path) is None
    cfg = Config.from_dict(ckpt.read_meta(path)["config"]).model
    model = GPT(cfg).eval()
    model.load_state_dict(load_state_dict(path, cfg.tie_embeddings))
    with torch.no_grad():
        return model(tokens)


def load_exported(path: Path):
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kv,tied,shard_in,shard_out", [
    (4, True, None, "2GB"),        # MHA, tied
    (4, False, "40KB", "40KB"),    # MHA, untied, sharded in and out
    (2, True, "40KB", "2GB"),      # GQA, tied, sharded input
    (2, False, None, "40KB"),      # GQA, untied, sharded output
], ids=["mha-tied", "mha-untied-sharded", "gqa-tied-sharded-in", "gqa-untied-sharded-out"])
def test_round_trip_matches_transformers(tmp_path, sp_model, kv, tied, shard_in, shard_out):
    src, model = make_hf(tmp_path / "hf", sp_model, kv, tied, shard_in)
    assert (src / "model.safetensors.index.json").is_file() == bool(shard_in)
    ref = hf_logits(model, TOKENS)
    out = import_hf(src, tmp_path / "ckpt", d1=1_000_000)
    meta = ckpt.read_meta(out)
    m = meta["config"]["model"]
    assert (m["n_kv_heads"], m["tie_embeddings"], m["rope_theta"], m["norm_eps"]) == \
        (None if kv == 4 else kv, tied, 50000.0, 1e-6)
    assert (meta["stage"], meta["method"], meta["D1"], meta["tokens_seen"], meta["D2"]) == \
        ("base", "hf-import", 1_000_000, 1_000_000, 0)
    assert meta["tokenizer"]["sha256"] == Tokenizer(sp_model).sha256
    assert (out / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    torch.testing.assert_close(ours_logits(out, TOKENS), ref, atol=TOL, rtol=0)

    exported = export_hf(out, tmp_path / "export", max_shard_size=shard_out)
    assert (exported / "model.safetensors.index.json").is_file() == (shard_out == "40KB")
    assert (exported / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    back = load_exported(exported)
    assert back.config.tie_word_embeddings == tied and back.config.num_key_value_heads == kv
    torch.testing.assert_close(hf_logits(back, TOKENS), ref, atol=TOL, rtol=0)


def test_bf16_export_holds_rounded_weights(tmp_path, sp_model):
    src, model = make_hf(tmp_path / "hf", sp_model, 2, False)
    out = import_hf(src, tmp_path / "ckpt", d1=1)
    back = LlamaForCausalLM.from_pretrained(export_hf(out, tmp_path / "bf16", dtype="bfloat16"),
                                            dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    for (name, p), (_, q) in zip(model.named_parameters(), back.named_parameters()):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.to(torch.bfloat16)), name


def test_grown_model_exports_and_matches(tmp_path, sp_model):
    src, model = make_hf(tmp_path / "hf", sp_model, 2, True)
    base = import_hf(src, tmp_path / "ckpt", d1=10**6)
    try:
        from megareuse.reuse.growth import grow_checkpoint
    except ImportError:  # growth not available: a bigger random model stands in for a grown one
        grow_checkpoint = None
    if grow_checkpoint is not None:
        # width x2 (unties the head) and depth x2 with identity blocks: function-preserving
        grown = grow_checkpoint(base, tmp_path / "grown", width=2, depth=2, depth_method="identity")
    else:
        meta = ckpt.read_meta(base)
        cfg = Config.from_dict(apply_overrides(meta["config"], [
            "model.d_model=128", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_hidden=192",
            "model.n_layers=4", "model.tie_embeddings=false"]))
        grown = ckpt.save_checkpoint(tmp_path / "g", 0, {"model": GPT(cfg.model).state_dict()},
                                     dict(meta, config=cfg.to_dict()))
    g = ckpt.read_meta(grown)["config"]["model"]
    assert (g["d_model"], g["n_layers"], g["n_heads"], g["tie_embeddings"]) == (128, 4, 8, False)
    back = load_exported(export_hf(grown, tmp_path / "export"))
    assert (back.config.hidden_size, back.config.num_hidden_layers, back.config.num_key_value_heads) == (128, 4, 4)
    logits = hf_logits(back, TOKENS)
    torch.testing.assert_close(logits, ours_logits(grown, TOKENS), atol=TOL, rtol=0)
    if grow_checkpoint is not None:  # the grown model computes the base's function
        torch.testing.assert_close(logits, hf_logits(model, TOKENS), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def plain_hf(tmp_path_factory, sp_model):
    return make_hf(tmp_path_factory.mktemp("plain") / "hf", sp_model, 2, True)[0]


@pytest.mark.parametrize("change,field", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 32}, "_proj.weight has shape"),  # an explicit head_dim is read; the weights disagree
    ({"model_type": "gpt2"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"intermediate_size": 128}, "_proj.weight has shape"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
])
def test_unsupported_fields_name_the_field_and_write_nothing(tmp_path, plain_hf, change, field, capsys):
    src = tmp_path / "hf"
    shutil.copytree(plain_hf, src)
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(HFError, match=field.replace(".", r"\.")):
        import_hf(src, tmp_path / "ckpt", d1=1)
    assert not (tmp_path / "ckpt").exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]
    # the same through the command: exit 2, one stderr line naming the field
    assert main(["import-hf", "--from", str(src), "--out", str(tmp_path / "c2"), "--d1", "3T"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megareuse import-hf: ") and field in err[0]
    assert not (tmp_path / "c2").exists()


def test_config_mapping_reads_transformers4_fields():
    raw = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
           "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
           "rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 2048, "tie_word_embeddings": False}  # TinyLlama-1.1B's shape
    cfg = model_config_from_hf(raw)
    assert (cfg.d_model, cfg.n_kv_heads, cfg.head_size, cfg.rope_theta, cfg.max_seq_len) == (2048, 4, 64, 1e4, 2048)
    assert model_config_from_hf(dict(raw, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
                                max_seq_len=512).rope_theta == 5e5


def test_cli_round_trip_and_export_errors(tmp_path, plain_hf, capsys):
    def run(*argv):
        return main(list(argv))

    assert run("import-hf", "--from", str(plain_hf), "--out", str(tmp_path / "c"), "--d1", "1.5T") == 0
    assert ckpt.read_meta(tmp_path / "c")["D1"] == 1_500_000_000_000
    assert capsys.readouterr().out.strip() == str(tmp_path / "c")
    for argv, needle in [(["--dtype", "int8"], "--dtype"), (["--max-shard-size", "lots"], "--max-shard-size")]:
        assert run("export-hf", "--from", str(tmp_path / "c"), "--out", str(tmp_path / "e"), *argv) == 2
        assert needle in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert run("export-hf", "--from", str(tmp_path / "c"), "--out", str(tmp_path / "e")) == 0
    assert run("export-hf", "--from", str(tmp_path / "c"), "--out", str(tmp_path / "e")) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert run("import-hf", "--from", str(plain_hf), "--out", str(tmp_path / "c"), "--d1", "1T") == 2
    assert run("import-hf", "--from", str(plain_hf), "--out", str(tmp_path / "c3"), "--d1", "lots") == 2
    assert "--d1" in capsys.readouterr().err and not (tmp_path / "c3").exists()
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in TEXTS[:3]:
        shutil.copyfile(STDLIB / name, docs / name)
    assert run("prepare-hf", "--tokenizer", str(tmp_path / "c"), "--out", str(tmp_path / "d"),
               "--files", f"code={docs}/*.py", "--workers", "1") == 0
    assert json.loads((tmp_path / "d" / "prepare.json").read_text())["domains"]["code"]["source_files"] == 3
    assert run("prepare-hf", "--tokenizer", str(docs), "--out", str(tmp_path / "d2"), "--files", "x=none*") == 2
    assert capsys.readouterr().err.startswith("megareuse prepare-hf: ") and not (tmp_path / "d2").exists()


def test_imported_tokenizer_data_feeds_stage2_and_cpt_exports(tmp_path, plain_hf):
    from megareuse.engine.inputs import open_training_data
    from megareuse.engine.init_source import open_init_source

    base = import_hf(plain_hf, tmp_path / "ckpt", d1=2_000_000)
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in TEXTS + ["calendar.py", "heapq.py"]:
        shutil.copyfile(STDLIB / name, docs / f"{name}.txt")
    files = sorted(docs.iterdir())
    info = prepare_with_tokenizer(tmp_path / "data", {"code": files}, base, valid=2, progress=False)
    tok = Tokenizer(tmp_path / "data" / "tokenizer.model")
    assert tok.sha256 == info["tokenizer_sha256"] == ckpt.read_meta(base)["tokenizer"]["sha256"]
    # the documented stage-2 config: `base:` the checkpoint's config.yaml, then data and run
    (tmp_path / "cpt.yaml").write_text(f"base: {base / 'config.yaml'}\ndata:\n  dir: {tmp_path / 'data'}\n"
                                       "  train: {code: 1}\n  valid: [code]\n  seq_len: 32\n")
    cfg = load_config(tmp_path / "cpt.yaml", [f"run.init_from={base}"])
    source = open_init_source(base, cfg, tok.sha256)
    assert (source.D1, source.stage) == (2_000_000, "cpt")
    data = open_training_data(cfg.data, cfg.model)
    valid_names = set(info["domains"]["code"]["valid_files"])
    expected = sorted(tok.encode(p.read_text()) + [tok.eos_id] for p in files if p.name not in valid_names)
    assert data.train_domains == ["code"] and set(data.valid) == {"code"} and len(valid_names) == 2
    train = IndexedDataset(str(tmp_path / "data" / "code_train"))  # valid=2: held-out docs leave the order
    assert sorted(train.document(d).tolist() for d in range(train.num_documents)) == expected

    # stage 2 for a few steps, then export the trainer's checkpoint: transformers computes the same
    from megareuse.engine.trainer import Trainer
    run = apply_overrides(cfg.to_dict(), [
        f"run.out_dir={tmp_path / 'cpt'}", "run.train_tokens=256", "run.micro_batch_size=4",
        "run.eval_interval=1000", "run.eval_tokens=256", "run.save_interval=1000", "run.log_interval=1000",
        "run.threads=1", "schedule.warmup_steps=1"])
    Trainer(Config.from_dict(run), emit=lambda _: None).run()
    step = ckpt.latest_checkpoint(tmp_path / "cpt" / "checkpoints")
    meta = ckpt.read_meta(step)
    assert (meta["stage"], meta["D1"], meta["D2"]) == ("cpt", 2_000_000, 256)
    back = load_exported(export_hf(step, tmp_path / "export"))
    torch.testing.assert_close(hf_logits(back, TOKENS), ours_logits(step, TOKENS), atol=TOL, rtol=0)
    # the HF base's files and token ids are found through init_from (the trainer keeps only tokenizer.model)
    assert (tmp_path / "export" / "generation_config.json").is_file()
    assert back.config.pad_token_id is None and back.config.eos_token_id == 2


def test_tokenizer_json_adapter_prepares_data(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([(STDLIB / n).read_text() for n in TEXTS],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    adapter = JsonTokenizer(tmp_path / "tokenizer.json")
    assert adapter.eos_id == tok.token_to_id("</s>") and adapter.vocab_size == tok.get_vocab_size()
    files = [STDLIB / n for n in TEXTS]
    info = prepare_with_tokenizer(tmp_path / "data", {"code": files}, tmp_path / "tokenizer.json",
                                  valid=1, progress=False)
    assert info["tokenizer"] == "tokenizer.json" and (tmp_path / "data" / "tokenizer.json").is_file()
    first = next(p for p in files if p.name not in info["domains"]["code"]["valid_files"])
    ids = IndexedDataset(str(tmp_path / "data" / "code_train"))[0].tolist()
    assert ids == tok.encode(first.read_text(), add_special_tokens=False).ids + [adapter.eos_id]


def test_foreign_sentencepiece_encodes_whole_documents(tmp_path):
    """A Llama-style sentencepiece model (dummy prefix, byte fallback, identity normalisation)
    tokenizes each document in one sentencepiece call, as the base model's own tokenizer does;
    megareuse's line-chunked Tokenizer.encode would add a dummy-prefix space at every chunk."""
    import sentencepiece as spm

    lines = [line for n in TEXTS for line in (STDLIB / n).read_text().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "llama"),
                                   vocab_size=600, model_type="bpe", byte_fallback=True, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, split_digits=True)  # Llama's settings
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "llama.model"))
    files = [STDLIB / n for n in TEXTS]
    info = prepare_with_tokenizer(tmp_path / "data", {"code": files}, tmp_path / "llama.model",
                                  valid=1, workers=2, progress=False)
    first = next(p for p in files if p.name not in info["domains"]["code"]["valid_files"])
    ids = IndexedDataset(str(tmp_path / "data" / "code_train"))[0].tolist()
    assert ids == sp.encode(first.read_text()) + [sp.eos_id()]
    assert ids[:-1] != Tokenizer(tmp_path / "llama.model").encode(first.read_text())  # chunked: differs


def test_missing_safetensors_is_one_clear_line(tmp_path, plain_hf, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(HFError, match="pip install safetensors"):
        import_hf(plain_hf, tmp_path / "ckpt", d1=1)
    assert not (tmp_path / "ckpt").exists()
