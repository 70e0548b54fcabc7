"""Training on data from anywhere: Megatron path prefixes with data.tokenizer, dotted domain
names, tokenizer.json data directories (checkpoint, evaluate, stage 2, grow, export), and the
one-line errors for bad inputs."""
import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_utils import base_env
from megareuse.config import load_config
from megareuse.data import GPTDataset, IndexedDataset, IndexedDatasetBuilder, Tokenizer, prepare
from megareuse.engine import checkpoint as ckpt
from megareuse.engine.evaluate import evaluate_checkpoint
from megareuse.engine.inputs import DataError, open_training_data
from megareuse.engine.metrics import read_metrics
from megareuse.engine.trainer import Trainer
from megareuse.engine.weights import load_state_dict
from megareuse.model import GPT

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "train" / "tiny_base.yaml"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = ["textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py", "calendar.py"]
VOCAB = 400  # the sentencepiece tokenizer's; the model's vocabulary is 512


def tiny(out_dir, *extra):
    return load_config(CONFIG, [
        f"run.out_dir={out_dir}", "model.vocab_size=512", "model.d_model=32", "model.n_heads=2",
        "model.n_kv_heads=1", "model.n_layers=2", "model.ffn_hidden=64", "model.max_seq_len=32",
        "data.seq_len=32", "run.micro_batch_size=4", "run.grad_accum=1", "run.train_tokens=768",  # 6 steps
        "run.eval_interval=3", "run.eval_tokens=512", "run.save_interval=100", "run.log_interval=100",
        "run.threads=1", "schedule.warmup_steps=2", *extra])


def quiet(_):
    pass


def final_checkpoint(out_dir):
    return ckpt.latest_checkpoint(Path(out_dir) / "checkpoints")


@pytest.fixture(scope="module")
def dotted(tmp_path_factory):
    """A data directory prepared by ``megareuse.data.prepare`` with the dotted domain wiki.en."""
    out = tmp_path_factory.mktemp("dotted") / "data"
    prepare(out, {"wiki.en": [STDLIB / n for n in TEXTS]}, vocab_size=VOCAB, valid=2, workers=1, progress=False)
    return out


def reference_loss(step: Path, prefix: Path, seq_len: int, tokens: int) -> float:
    """Validation loss recomputed from the weights and the .bin/.idx pair: plain GPT forward and
    torch's cross-entropy over the first tokens // seq_len samples of the seeded dataset."""
    cfg = ckpt.read_meta(step)["config"]["model"]
    from megareuse.config import ModelConfig
    model_cfg = ModelConfig(**cfg)
    model = GPT(model_cfg)
    model.load_state_dict(load_state_dict(step, model_cfg.tie_embeddings, model=model_cfg))
    dataset = GPTDataset(IndexedDataset(str(prefix)), seq_len, seed=0)
    batch = dataset.batch(0, min(tokens // seq_len, dataset.num_samples))
    with torch.no_grad():
        logits = model(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                             batch[:, 1:].reshape(-1)).item()


def write_megatron(prefix: Path, docs: list[list[int]]) -> None:
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for ids in docs:
            builder.add_document(np.asarray(ids, dtype=np.uint16))
        builder.finalize()


def test_megatron_prefix_trains_with_data_tokenizer(dotted, tmp_path, monkeypatch):
    tok = Tokenizer(dotted / "tokenizer.model")
    (tmp_path / "tok").mkdir()
    shutil.copyfile(dotted / "tokenizer.model", tmp_path / "tok" / "tokenizer.model")
    docs = [tok.encode((STDLIB / n).read_text()) + [tok.eos_id] for n in TEXTS]
    write_megatron(tmp_path / "corpus" / "my-text_text_document", docs[:-2])
    write_megatron(tmp_path / "corpus" / "held.out_text_document", docs[-2:])
    monkeypatch.chdir(tmp_path)  # relative prefixes resolve against the current directory
    train_key, valid_key = "corpus/my-text_text_document", "corpus/held.out_text_document.idx"
    cfg = tiny(tmp_path / "run", "data.dir=nowhere", f"data.train={{{train_key}: 1}}", f"data.valid=[{valid_key}]",
               "data.tokenizer=tok")
    trainer = Trainer(cfg, emit=quiet)
    assert trainer.data.train_tokens_available == {train_key: sum(len(d) for d in docs[:-2])}
    summary = trainer.run()
    assert not (tmp_path / "nowhere").exists()
    step = final_checkpoint(tmp_path / "run")
    meta = ckpt.read_meta(step)
    assert meta["tokenizer"]["file"] == "tokenizer.model" and meta["tokenizer"]["sha256"] == tok.sha256
    assert (step / "tokenizer.model").read_bytes() == (dotted / "tokenizer.model").read_bytes()
    loss = summary["valid_loss"][valid_key]
    evals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert evals[-1][f"valid_loss/{valid_key}"] == loss
    assert evaluate_checkpoint(step)[valid_key] == pytest.approx(loss, rel=1e-5)
    reference = reference_loss(step, tmp_path / "corpus" / "held.out_text_document", 32, 512)
    assert reference == pytest.approx(loss, rel=1e-5)
    (tmp_path / "tok").rename(tmp_path / "gone")  # evaluate falls back to the checkpoint's copy
    assert evaluate_checkpoint(step)[valid_key] == pytest.approx(loss, rel=1e-5)


def test_dotted_domain_trains_evaluates_and_records(dotted, tmp_path):
    from megareuse.records import collect

    cfg = tiny(tmp_path / "run", f"data.dir={dotted}", "data.train={wiki.en: 1}", "data.valid=[wiki.en]")
    summary = Trainer(cfg, emit=quiet).run()
    loss = summary["valid_loss"]["wiki.en"]
    step = final_checkpoint(tmp_path / "run")
    assert evaluate_checkpoint(step, domains=["wiki.en"])["wiki.en"] == pytest.approx(loss, rel=1e-5)
    assert reference_loss(step, dotted / "wiki.en_valid", 32, 512) == pytest.approx(loss, rel=1e-5)
    csv_path, _, n = collect(tmp_path)
    assert n == 1 and "valid_loss_wiki.en" in csv_path.read_text().splitlines()[0].split(",")
    # the dotted name also works as an override path
    again = tiny(tmp_path / "run2", f"data.dir={dotted}", "data.train.wiki.en=2", "data.valid=[wiki.en]")
    assert again.data.train == {"prose": 1.0, "wiki.en": 2}


def bpe_tokenizer(out: Path) -> Path:
    """A tiny BPE tokenizer.json trained locally (no downloads) + tokenizer_config.json."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, decoders, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([(STDLIB / n).read_text() for n in TEXTS],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|eot|>"]))
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>", "bos_token": "<s>"}))
    return out / "tokenizer.json"


@pytest.fixture(scope="module")
def json_run(tmp_path_factory):
    """A data directory tokenized with a tokenizer.json and a base run trained on it."""
    from megareuse.interop.hf_data import prepare_with_tokenizer

    root = tmp_path_factory.mktemp("jsonrun")
    tok_file = bpe_tokenizer(root / "hf")
    prepare_with_tokenizer(root / "data", {"code": [STDLIB / n for n in TEXTS]}, tok_file, valid=2,
                           workers=1, progress=False)
    summary = Trainer(tiny(root / "base", f"data.dir={root / 'data'}", "data.train={code: 1}",
                           "data.valid=[code]"), emit=quiet).run()
    return root, tok_file, summary


def test_tokenizer_json_data_dir_trains_evaluates_and_feeds_stage2(json_run, dotted):
    root, tok_file, summary = json_run
    assert not (root / "data" / "tokenizer.model").exists()
    step = final_checkpoint(root / "base")
    meta = ckpt.read_meta(step)
    sha = hashlib.sha256(tok_file.read_bytes()).hexdigest()
    assert meta["tokenizer"]["file"] == "tokenizer.json" and meta["tokenizer"]["sha256"] == sha
    assert meta["tokenizer"]["vocab_size"] == 400
    assert hashlib.sha256((step / "tokenizer.json").read_bytes()).hexdigest() == sha
    assert (step / "tokenizer_config.json").read_bytes() == (tok_file.parent / "tokenizer_config.json").read_bytes()
    assert not (step / "tokenizer.model").exists()
    loss = summary["valid_loss"]["code"]
    assert evaluate_checkpoint(step)["code"] == pytest.approx(loss, rel=1e-5)
    assert reference_loss(step, root / "data" / "code_valid", 32, 512) == pytest.approx(loss, rel=1e-5)
    # stage 2 (CPT) on the same data: the tokenizer sha256 matches the checkpoint's
    cpt = tiny(root / "cpt", f"data.dir={root / 'data'}", "data.train={code: 1}", "data.valid=[code]",
               f"run.init_from={step}")
    Trainer(cpt, emit=quiet).run()
    cpt_meta = ckpt.read_meta(final_checkpoint(root / "cpt"))
    assert (cpt_meta["stage"], cpt_meta["D1"], cpt_meta["D2"]) == ("cpt", 768, 768)
    assert cpt_meta["tokenizer"]["sha256"] == sha
    # data.tokenizer wins over data.dir's own tokenizer (here another one of the same size)
    other = tiny(root / "x", f"data.dir={root / 'data'}", "data.train={code: 1}", "data.valid=[code]",
                 f"data.tokenizer={dotted / 'tokenizer.model'}")
    opened = open_training_data(other.data, other.model)
    assert opened.tokenizer_source.origin == "data.tokenizer" and opened.tokenizer_file.name == "tokenizer.model"
    assert opened.tokenizer.sha256 == Tokenizer(dotted / "tokenizer.model").sha256 != sha


def test_tokenizer_json_checkpoint_grows_and_exports(json_run, tmp_path):
    from megareuse.data.hf_tokenizer import JsonTokenizer
    from megareuse.interop.hf import export_hf
    from megareuse.reuse.growth import grow_checkpoint

    root, tok_file, summary = json_run
    step = final_checkpoint(root / "base")
    grown = grow_checkpoint(step, tmp_path / "grown", depth=2)
    assert (grown / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    assert (grown / "tokenizer_config.json").is_file()
    assert ckpt.read_meta(grown)["tokenizer"]["file"] == "tokenizer.json"
    stack_loss = evaluate_checkpoint(grown)["code"]  # stacking changes the function; it evaluates
    assert np.isfinite(stack_loss)
    out = export_hf(step, tmp_path / "export")
    hf_config = json.loads((out / "config.json").read_text())
    tok = JsonTokenizer(tok_file)
    assert (hf_config["eos_token_id"], hf_config["bos_token_id"]) == (tok.eos_id, tok.bos_id) == (3, 1)
    assert (out / "tokenizer.json").read_bytes() == tok_file.read_bytes()


def data_cfg(tmp_path, *extra):
    return tiny(tmp_path / "run", *extra)


def test_bad_sources_are_one_line_errors_naming_the_field(dotted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = Tokenizer(dotted / "tokenizer.model")
    write_megatron(tmp_path / "c" / "ok_text_document", [tok.encode("some text\n" * 200) + [tok.eos_id]])
    write_megatron(tmp_path / "c" / "big_text_document", [list(range(0, 1000, 3)) * 4])
    shutil.copyfile(tmp_path / "c" / "ok_text_document.bin", tmp_path / "c" / "noidx_text_document.bin")
    (tmp_path / "junk.json").write_text("{not json")
    ok = "c/ok_text_document"
    cases = [
        (["data.train={c/noidx_text_document: 1}", f"data.tokenizer={dotted}"],
         "data.train.c/noidx_text_document names the path prefix 'c/noidx_text_document' but "
         f"{tmp_path / 'c' / 'noidx_text_document.idx'} does not exist"),
        ([f"data.train={{{ok}: 1}}", "data.valid=[c/missing_text_document]", f"data.tokenizer={dotted}"],
         "data.valid names the path prefix 'c/missing_text_document' but"),
        ([f"data.train={{{ok}: 1}}", "data.tokenizer=nope/tokenizer.model"], "data.tokenizer 'nope/tokenizer.model' "
         "does not exist"),
        ([f"data.train={{{ok}: 1}}", "data.tokenizer=junk.json"], "data.tokenizer = 'junk.json': "),
        ([f"data.train={{{ok}: 1}}", f"data.tokenizer={tmp_path / 'c'}"], "holds no tokenizer.model or tokenizer.json"),
        ([f"data.train={{{ok}: 1}}", "data.dir=nowhere"], "data.tokenizer is not set and data.dir = 'nowhere' "
         "does not exist"),
        ([f"data.train={{{ok}: 1}}", f"data.dir={dotted}", "data.train={c/big_text_document: 1}"],
         "holds token ids 0..999 but the tokenizer"),
        ([f"data.train={{{ok}: 1}}", "data.tokenizer=''"], "data.tokenizer"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError) as info:
            cfg = data_cfg(tmp_path, f"data.valid=[{ok}]", *overrides)
            open_training_data(cfg.data, cfg.model)
        text = str(info.value)
        assert message in text and "\n" not in text, (overrides, text)
    # the range error names the field and the accepted ids
    with pytest.raises(DataError, match=r"data\.train\.c/big_text_document = .*accepted ids 0\.\.399"):
        cfg = data_cfg(tmp_path, f"data.dir={dotted}", "data.train={c/big_text_document: 1}", f"data.valid=[{ok}]")
        open_training_data(cfg.data, cfg.model)
    # a valid prefix with data.dir's own tokenizer (no data.tokenizer) opens
    cfg = data_cfg(tmp_path, f"data.dir={dotted}", f"data.train={{{ok}: 1}}", f"data.valid=[{ok}, wiki.en]")
    assert set(open_training_data(cfg.data, cfg.model).valid) == {ok, "wiki.en"}
    # without a '/', a .bin/.idx ending makes a prefix (in the cwd); the bare name is a domain
    write_megatron(tmp_path / "bare_text_document", [tok.encode("other text\n" * 100) + [tok.eos_id]])
    cfg = data_cfg(tmp_path, f"data.dir={dotted}", "data.train={bare_text_document.bin: 1}",
                   "data.valid=[bare_text_document.idx]")
    opened = open_training_data(cfg.data, cfg.model)
    assert opened.valid["bare_text_document.idx"].num_samples == IndexedDataset("bare_text_document").num_tokens // 32
    with pytest.raises(DataError, match=r"names domain 'bare_text_document' .*\./bare_text_document would name"):
        cfg = data_cfg(tmp_path, f"data.dir={dotted}", "data.train={bare_text_document: 1}", f"data.valid=[{ok}]")
        open_training_data(cfg.data, cfg.model)
    # through the command: exit 2, one stderr line, nothing written
    proc = subprocess.run([sys.executable, "-m", "megareuse.cli", "train", "--config", str(CONFIG),
                           f"run.out_dir={tmp_path / 'out'}", "data.train={c/noidx_text_document.bin: 1}",
                           f"data.valid=[{ok}]", f"data.tokenizer={dotted}"],
                          cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "data.train.c/noidx_text_document.bin names the path prefix" in proc.stderr and not (tmp_path / "out").exists()


def test_sweep_plan_carries_dotted_domains_and_prefixes(tmp_path):
    """The sweep's per-run overrides give back the experiment's blend: dotted names and prefixes."""
    from megareuse.config import Config, apply_overrides
    from megareuse.sweep.grid import load_experiment, plan_experiment

    path = tmp_path / "exp.yaml"
    path.write_text(f"name: t\ntrain_config: {CONFIG}\noverrides: [model.vocab_size=512, data.tokenizer=/t]\n"
                    "base: {domains: {wiki.en: 1, /d/web_text_document: 0.5}, D1: [32768]}\n"
                    "stage2:\n  - {name: cpt, method: cpt, domains: {code.py: 1}, D2: [16384]}\n")
    exp = load_experiment(path)
    blends = {r.series: Config.from_dict(apply_overrides(exp.train, r.overrides)).data
              for r in plan_experiment(exp) if r.kind == "train"}
    assert blends["base"].train == {"wiki.en": 1, "/d/web_text_document": 0.5}
    assert blends["cpt"].train == {"code.py": 1} and blends["cpt"].tokenizer == "/t"


def test_stage2_from_an_imported_tokenizer_json_model(tmp_path):
    """An HF model whose only tokenizer is tokenizer.json: import, prepare with its tokenizer,
    continual pretraining (the sha256 check passes), export with its eos id."""
    transformers = pytest.importorskip("transformers")
    from megareuse.interop.hf import export_hf, import_hf
    from megareuse.interop.hf_data import prepare_with_tokenizer

    tok_file = bpe_tokenizer(tmp_path / "hf")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=True, eos_token_id=3, bos_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    base = import_hf(tmp_path / "hf", tmp_path / "base", d1=1_000_000)
    assert (base / "tokenizer.json").is_file() and not (base / "tokenizer.model").exists()
    prepare_with_tokenizer(tmp_path / "data", {"code": [STDLIB / n for n in TEXTS]}, base, valid=2,
                           workers=1, progress=False)
    (tmp_path / "cpt.yaml").write_text(f"base: {base / 'config.yaml'}\ndata:\n  dir: {tmp_path / 'data'}\n"
                                       "  train: {code: 1}\n  valid: [code]\n  seq_len: 32\n")
    cfg = load_config(tmp_path / "cpt.yaml", [
        f"run.init_from={base}", f"run.out_dir={tmp_path / 'cpt'}", "run.train_tokens=256", "run.micro_batch_size=4",
        "run.eval_interval=1000", "run.eval_tokens=256", "run.save_interval=1000", "run.log_interval=1000",
        "run.threads=1", "schedule.warmup_steps=1", "run.device=cpu", "run.dtype=fp32"])
    Trainer(cfg, emit=quiet).run()
    step = final_checkpoint(tmp_path / "cpt")
    meta = ckpt.read_meta(step)
    assert (meta["stage"], meta["D1"], meta["D2"]) == ("cpt", 1_000_000, 256)
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(tok_file.read_bytes()).hexdigest()
    exported = json.loads((export_hf(step, tmp_path / "export") / "config.json").read_text())
    assert exported["eos_token_id"] == 3 and (tmp_path / "export" / "tokenizer.json").is_file()


def test_users_jsonl_corpus_to_a_cpt_run(dotted, tmp_path):
    """docs/data.md's walk-through: a base run, the user's jsonl.gz corpus prepared with the base's
    tokenizer by `megareuse prepare --input`, then continual pretraining validated on it."""
    import gzip

    from megareuse.cli import main

    base = tiny(tmp_path / "base", f"data.dir={dotted}", "data.train={wiki.en: 1}", "data.valid=[wiki.en]")
    Trainer(base, emit=quiet).run()
    step = final_checkpoint(tmp_path / "base")
    (tmp_path / "corpus").mkdir()
    for i, names in enumerate((TEXTS[:4], TEXTS[4:])):
        with gzip.open(tmp_path / "corpus" / f"part-{i}.jsonl.gz", "wt") as fh:
            fh.writelines(json.dumps({"text": (STDLIB / n).read_text(), "source": n}) + "\n" for n in names)
    assert main(["prepare", "--out", str(tmp_path / "mine"), "--input", f"mine={tmp_path / 'corpus'}/*.jsonl.gz",
                 "--tokenizer", str(dotted / "tokenizer.model"), "--valid-docs", "2", "--workers", "2"]) == 0
    cpt = tiny(tmp_path / "cpt", f"data.dir={tmp_path / 'mine'}", "data.train={mine: 1}", "data.valid=[mine]",
               f"run.init_from={step}")
    summary = Trainer(cpt, emit=quiet).run()
    meta = ckpt.read_meta(final_checkpoint(tmp_path / "cpt"))
    assert (meta["stage"], meta["D1"], meta["D2"]) == ("cpt", 768, 768)
    assert reference_loss(final_checkpoint(tmp_path / "cpt"), tmp_path / "mine" / "mine_valid", 32, 512) == \
        pytest.approx(summary["valid_loss"]["mine"], rel=1e-5)
