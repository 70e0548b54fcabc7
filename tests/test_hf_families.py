"""The model families people reuse, checked against transformers' own classes: Llama 3.x (llama3
RoPE scaling, tied embeddings), Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms, head_dim !=
hidden / heads) and Mistral (a sliding window). For random-weight models built and saved by
transformers: import-hf gives the same logits (fp32, 1e-5 relative), also at TP=2 on 2 gloo
ranks; export-hf writes the same class back with the same logits; a few CPT steps train and
export. Everything is built locally: no downloads."""
import json
import os
import shutil
import sysconfig
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers", reason="transformers is a test/extra dependency (pip install -e .[hf])")
pytest.importorskip("safetensors", reason="HF interop needs safetensors")

from megareuse.config import Config, apply_overrides, load_config  # noqa: E402
from megareuse.data import Tokenizer, train_tokenizer  # noqa: E402
from megareuse.engine import checkpoint as ckpt  # noqa: E402
from megareuse.engine.weights import load_state_dict  # noqa: E402
from megareuse.interop.hf import HFError, export_hf, import_hf, model_config_from_hf  # noqa: E402
from megareuse.interop.hf_data import prepare_with_tokenizer  # noqa: E402
from megareuse.model import GPT  # noqa: E402

VOCAB = 544  # the tokenizer has 512 pieces
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = ["textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py"]
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=64)
# family -> (transformers config class, its fields, the ModelConfig features the import must set)
FAMILIES = {
    "llama31": ("LlamaConfig", dict(rope_theta=500000.0, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), dict(rope_scaling="llama3", rope_factor=8.0,
                                                       rope_original_max_seq_len=16, tie_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6), dict(qkv_bias=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False), dict(qk_norm=True, head_dim=32)),
    "mistral": ("MistralConfig", dict(sliding_window=32, max_position_embeddings=128),
                dict(sliding_window=32, max_seq_len=32)),
}


def assert_close(actual, expected, what=""):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer([STDLIB / name for name in TEXTS[:6]], prefix, 512).path


def build_hf(root: Path, family: str, sp_model: Path):
    """A random transformers model of ``family`` saved with save_pretrained (+ tokenizer.model).
    Every tensor is drawn, biases and norm gains included, so a misplaced one would show."""
    cls_name, fields, _ = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**COMMON, **fields}, attn_implementation="eager")
    torch.manual_seed(hash(family) % 1000)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    model.save_pretrained(root)
    shutil.copyfile(sp_model, root / "tokenizer.model")
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory, sp_model):
    """family -> (HF dir, transformers model, its logits, imported checkpoint)."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        model = build_hf(root / "hf", family, sp_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mistral: max_seq_len clamped to the window (tested below)
            ckpt_dir = import_hf(root / "hf", root / "ckpt", d1=10**6)
        with torch.no_grad():
            logits = model(TOKENS).logits.float()
        out[family] = (root / "hf", model, logits, ckpt_dir)
    return out


def ours(path: Path) -> GPT:
    cfg = Config.from_dict(ckpt.read_meta(path)["config"]).model
    model = GPT(cfg).eval()
    model.load_state_dict(load_state_dict(path, cfg.tie_embeddings))
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_transformers(imported, family):
    _, _, ref, path = imported[family]
    model_cfg = ckpt.read_meta(path)["config"]["model"]
    for name, value in FAMILIES[family][2].items():
        assert model_cfg[name] == value, name
    with torch.no_grad():
        assert_close(ours(path)(TOKENS), ref, family)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_gives_the_same_class_and_logits(imported, family, tmp_path):
    src, model, ref, path = imported[family]
    exported = export_hf(path, tmp_path / "export")
    written, original = (json.loads((d / "config.json").read_text()) for d in (exported, src))
    assert written["architectures"] == original["architectures"] == [type(model).__name__]
    assert written["model_type"] == original["model_type"]
    back = transformers.AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    assert type(back) is type(model)
    for name in ("sliding_window", "tie_word_embeddings", "num_key_value_heads", "rope_parameters"):
        assert getattr(back.config, name, None) == getattr(model.config, name, None), name
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    assert back.config.head_dim == head_dim
    with torch.no_grad():
        assert_close(back(TOKENS).logits.float(), ref, family)


def test_mistral_window_sets_max_seq_len_and_is_refused_when_narrower(imported):
    raw = json.loads((imported["mistral"][0] / "config.json").read_text())
    with pytest.warns(UserWarning, match="max_seq_len set to 32"):
        assert model_config_from_hf(raw).max_seq_len == 32
    assert model_config_from_hf(raw, max_seq_len=16).max_seq_len == 16
    with pytest.raises(HFError, match=r"sliding_window = 32: accepted null or at least max_seq_len=64"):
        model_config_from_hf(raw, max_seq_len=64)


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gemma"}, "model_type"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"head_dim": 0}, "head_dim"),
])
def test_refused_fields_are_named(imported, tmp_path, change, field):
    raw = json.loads((imported["qwen3"][0] / "config.json").read_text())
    raw.update(change)
    with pytest.raises(HFError, match=rf"config.json field {field}\b.*accepted"):
        model_config_from_hf(raw)


def test_qwen_window_only_counts_when_switched_on(imported):
    raw = json.loads((imported["qwen2"][0] / "config.json").read_text())
    raw.pop("layer_types", None)
    raw.update(sliding_window=16, use_sliding_window=False, max_window_layers=0)
    assert model_config_from_hf(raw).sliding_window is None  # off: full attention, any length
    raw["use_sliding_window"] = True
    with pytest.warns(UserWarning, match="max_seq_len set to 16"):
        assert model_config_from_hf(raw).sliding_window == 16


# --------------------------------------------------------------------------- TP = 2
def rank_main(rank: int, tmp: str, paths: dict) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        from megareuse.parallel import gather_logits, init_parallel_state, parallelize_model, shard_state_dict

        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        state = init_parallel_state(2)
        out = {}
        for family, path in paths.items():
            model = ours(Path(path))
            full = model.state_dict()
            parallelize_model(model, state)
            model.load_state_dict(shard_state_dict(full, model.cfg, state))
            with torch.no_grad():
                out[family] = gather_logits(model(TOKENS), state)
        torch.save(out, f"{tmp}/rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        Path(f"{tmp}/rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


def test_tp2_logits_match_transformers(imported, tmp_path):
    paths = {family: str(item[3]) for family, item in imported.items()}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, str(tmp_path), paths), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(p.exitcode is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join(5)
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(2) if (tmp_path / f"rank{r}.err").exists()]
    assert not errors and all(p.exitcode == 0 for p in procs), errors
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for family, (_, _, ref, _) in imported.items():
            assert_close(got[family], ref, f"{family} rank {rank}")


# --------------------------------------------------------------------------- CPT
@pytest.fixture(scope="module")
def code_data(tmp_path_factory, imported):
    root = tmp_path_factory.mktemp("data")
    docs = root / "docs"
    docs.mkdir()
    for name in TEXTS:
        shutil.copyfile(STDLIB / name, docs / f"{name}.txt")
    prepare_with_tokenizer(root / "prepared", {"code": sorted(docs.iterdir())}, imported["qwen2"][3],
                           valid=2, progress=False)
    return root / "prepared"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cpt_steps_train_and_export(imported, code_data, family, tmp_path):
    from megareuse.engine.trainer import Trainer

    src, model, _, base = imported[family]
    (tmp_path / "cpt.yaml").write_text(f"base: {base / 'config.yaml'}\ndata:\n  dir: {code_data}\n"
                                       "  train: {code: 1}\n  valid: [code]\n  seq_len: 32\n")
    cfg = load_config(tmp_path / "cpt.yaml", [f"run.init_from={base}"])
    run = apply_overrides(cfg.to_dict(), [
        f"run.out_dir={tmp_path / 'cpt'}", "run.train_tokens=384", "run.micro_batch_size=4",
        "run.eval_interval=1000", "run.eval_tokens=128", "run.save_interval=1000", "run.log_interval=1000",
        "run.threads=1", "schedule.warmup_steps=1", "optim.lr=1e-3"])
    Trainer(Config.from_dict(run), emit=lambda _: None).run()
    step = ckpt.latest_checkpoint(tmp_path / "cpt" / "checkpoints")
    meta = ckpt.read_meta(step)
    assert (meta["stage"], meta["D1"], meta["D2"]) == ("cpt", 10**6, 384)
    trained = ours(step)
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, ours(base).state_dict()[k])]
    assert any(k.endswith(".bias") or "q_norm" in k for k in moved) or family in ("llama31", "mistral")
    back = transformers.AutoModelForCausalLM.from_pretrained(export_hf(step, tmp_path / "export"),
                                                             attn_implementation="eager").eval()
    assert type(back) is type(model)
    with torch.no_grad():
        assert_close(back(TOKENS).logits.float(), trained(TOKENS), family)
    assert Tokenizer(tmp_path / "export" / "tokenizer.model").sha256 == Tokenizer(src / "tokenizer.model").sha256
