"""Stage 2: continual pretraining from a base checkpoint, replay, run records, collect."""
import csv
import json

import pytest

from megareuse.config import ConfigError, load_config
from megareuse.engine import checkpoint as ckpt
from megareuse.engine.metrics import read_metrics
from megareuse.engine.trainer import Trainer
from megareuse.engine.init_source import replay_blend
from megareuse.records import collect

from test_train import CONFIG, quiet


def tiny(prepared, out_dir, *extra):
    return load_config(CONFIG, [
        f"data.dir={prepared}", f"run.out_dir={out_dir}", "model.vocab_size=512",
        "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=2",
        "model.ffn_hidden=64", "model.max_seq_len=32", "data.seq_len=32", "data.valid=[prose, code]",
        "run.micro_batch_size=8", "run.eval_interval=10", "run.eval_tokens=2048",
        "run.save_interval=1000", "run.log_interval=1000", "run.threads=1",
        "schedule.warmup_steps=4", "optim.lr=1e-2", *extra])


@pytest.fixture(scope="module")
def base(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "base"
    summary = Trainer(tiny(prepared, out, "run.train_tokens=10240"), emit=quiet).run()  # 40 steps
    return out, summary


def test_base_record(base):
    out, summary = base
    record = json.loads((out / "record.json").read_text())
    assert record["stage"] == "base" and record["method"] == "base"
    assert record["D1"] == summary["tokens"] == 40 * 256 and record["D2"] == 0
    assert record["tokens_per_domain"] == {"prose": 40 * 256}
    assert record["valid_loss"]["prose"] == summary["valid_loss"]["prose"]
    assert record["best_valid_loss"]["prose"] == min(h["prose"] for h in record["history"])
    assert [h["step"] for h in record["history"]] == [10, 20, 30, 40]


def test_cpt_rewarms_counts_d2_and_lowers_code_loss(prepared, base, tmp_path):
    base_dir, base_summary = base
    init = base_dir / "checkpoints" / "step_00000040"
    cfg = tiny(prepared, tmp_path / "cpt", "run.train_tokens=5120", "data.train={code: 1}",
               f"run.init_from={init}")
    trainer = Trainer(cfg, emit=quiet)
    before = trainer.evaluate()
    assert before["code"] == pytest.approx(base_summary["valid_loss"]["code"], rel=1e-6)  # weights loaded
    summary = trainer.run()
    train = [r for r in read_metrics(tmp_path / "cpt") if r["kind"] == "train"]
    assert train[0]["lr"] == pytest.approx(1e-2 / 4)  # re-warmup from the start of stage 2
    assert max(r["lr"] for r in train) == pytest.approx(1e-2)
    assert train[-1]["lr"] == pytest.approx(1e-3)  # decays over D2
    record = json.loads((tmp_path / "cpt" / "record.json").read_text())
    assert record["stage"] == "cpt" and record["method"] == "cpt"
    assert record["D1"] == 40 * 256 and record["D2"] == 20 * 256 == summary["tokens"]
    assert record["init_from"]["path"] == str(init)
    assert summary["valid_loss"]["code"] < before["code"] - 0.3
    meta = ckpt.read_meta(tmp_path / "cpt" / "checkpoints" / "step_00000020")
    assert (meta["D1"], meta["D2"], meta["stage"]) == (40 * 256, 20 * 256, "cpt")


def test_replay_mixture_is_counted(prepared, base, tmp_path):
    base_dir, _ = base
    cfg = tiny(prepared, tmp_path / "replay", "run.train_tokens=8192", "data.train={code: 1}",
               "data.replay=0.25", f"run.init_from={base_dir / 'checkpoints' / 'step_00000040'}")
    trainer = Trainer(cfg, emit=quiet)
    # count, independently of the blend, which domain each consumed sample came from
    from megareuse.data import GPTDataset, IndexedDataset
    code = GPTDataset(IndexedDataset(str(prepared / "code_train")), 32, seed=0, shuffle=False)
    code_samples = {code.sample(i).tobytes() for i in range(code.num_samples)}
    seen = {"code": 0, "prose": 0}
    original = trainer.data.train.batch

    def counting(start, size):
        batch = original(start, size)
        for row in batch.numpy().astype(code.sample(0).dtype):
            seen["code" if row.tobytes() in code_samples else "prose"] += 1
        return batch

    trainer.data.train.batch = counting
    trainer.run()
    total = sum(seen.values())
    assert total == 32 * 8
    assert seen["prose"] / total == pytest.approx(0.25, abs=1 / total)
    record = json.loads((tmp_path / "replay" / "record.json").read_text())
    assert record["tokens_per_domain"] == {"code": seen["code"] * 32, "prose": seen["prose"] * 32}


def test_replay_blend_weights():
    assert replay_blend({"code": 2.0}, 0.2, {"prose": 1.0}) == pytest.approx({"code": 0.8, "prose": 0.2})
    assert replay_blend({"code": 1.0, "prose": 1.0}, 0.5, {"prose": 1.0}) == \
        pytest.approx({"code": 0.25, "prose": 0.75})
    assert replay_blend({"code": 1.0}, 0.0, {"prose": 1.0}) == {"code": 1.0}


def test_refuses_other_shape_other_tokenizer_and_bad_flags(prepared, base, tmp_path):
    from megareuse.data.preprocess import prepare
    init = base[0] / "checkpoints" / "step_00000040"
    with pytest.raises(ckpt.CheckpointError, match="another model shape: model.n_layers: checkpoint 2 vs config 3"):
        Trainer(tiny(prepared, tmp_path / "a", f"run.init_from={init}", "model.n_layers=3"), emit=quiet)
    docs = []
    for i in range(6):
        doc = tmp_path / f"doc{i}.txt"
        doc.write_text(f"Some other text number {i}. " * 400)
        docs.append(doc)
    other = tmp_path / "other"
    prepare(other, {"prose": docs, "code": docs}, vocab_size=300, progress=False)
    with pytest.raises(ckpt.CheckpointError, match="another tokenizer"):
        Trainer(tiny(other, tmp_path / "b", f"run.init_from={init}"), emit=quiet)
    with pytest.raises(ConfigError, match="run.keep_optimizer = True: accepted false unless run.init_from"):
        tiny(prepared, tmp_path / "c", "run.keep_optimizer=true")
    with pytest.raises(ConfigError, match="data.replay = 0.5: accepted 0 unless run.init_from"):
        tiny(prepared, tmp_path / "c", "data.replay=0.5")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_keep_optimizer_continues_adam_state(prepared, base, tmp_path):
    init = base[0] / "checkpoints" / "step_00000040"
    trainer = Trainer(tiny(prepared, tmp_path / "keep", f"run.init_from={init}", "run.keep_optimizer=true",
                           "run.train_tokens=512"), emit=quiet)
    state = trainer.engine.optimizer.state
    steps = {float(s["step"]) for s in state.values()}
    assert steps == {40.0}  # Adam moments and step counts of the base's 40 steps


def test_collect_table(prepared, base, tmp_path):
    csv_path, jsonl_path, n = collect(base[0].parent)
    rows = list(csv.DictReader(open(csv_path)))
    assert n == 1 and rows[0]["method"] == "base" and int(rows[0]["D1"]) == 40 * 256
    assert float(rows[0]["valid_loss_prose"]) == json.loads((base[0] / "record.json").read_text())["valid_loss"]["prose"]
    assert json.loads(jsonl_path.read_text().splitlines()[0])["run_id"] == "base"
    with pytest.raises(FileNotFoundError, match="no record.json"):
        collect(tmp_path)


def test_width_growth_then_training_lowers_prose_loss(prepared, base, tmp_path):
    """Grow the base 2x in width (function-preserving), then train the wide model on prose.

    40 steps of 1024 tokens: the former 20 steps of 256 tokens lowered the loss by only
    0.03 +- 0.02 nats over data orders (0.012 without the King James Bible in the prose corpus).
    Measured over 5 data orders and growth seeds: the drop is 0.35 +- 0.02 nats without KJV and
    0.42 +- 0.02 with it (min 0.32), far from the 0.15 bound, which is far from zero. A wide model
    trained from scratch for the same 40 steps ends about as low, so the step-10 evaluation must
    still be near the start: grown runs are 0.04-0.12 below it, fresh ones ~0.3 above.
    """
    from megareuse.reuse.growth import grow_checkpoint
    base_dir, base_summary = base
    grown = grow_checkpoint(base_dir / "checkpoints" / "step_00000040", tmp_path / "grown",
                            width=2, noise=1e-3, seed=0)
    wide = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
            "model.tie_embeddings=false"]
    cfg = tiny(prepared, tmp_path / "wide", *wide, "run.train_tokens=40960", "run.micro_batch_size=32",
               f"run.init_from={grown}", "optim.lr=3e-3")
    trainer = Trainer(cfg, emit=quiet)
    start = trainer.evaluate()["prose"]
    assert start == pytest.approx(base_summary["valid_loss"]["prose"], abs=1e-4)  # function preserved
    summary = trainer.run()
    record = json.loads((tmp_path / "wide" / "record.json").read_text())
    history = [h["prose"] for h in record["history"]]
    assert [h["step"] for h in record["history"]] == [10, 20, 30, 40]
    assert history[0] < start + 0.1, (start, history)  # continued from the grown weights
    assert summary["valid_loss"]["prose"] == history[-1] < start - 0.15, (start, history)
    assert (record["stage"], record["method"], record["D1"], record["D2"]) == ("grow", "width", 40 * 256, 40960)
