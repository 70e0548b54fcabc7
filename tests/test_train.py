"""Training: loss falls, accumulation is exact, resume is bit-identical, bad input is refused."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_utils import base_env
from megareuse.config import load_config
from megareuse.engine import checkpoint as ckpt
from megareuse.engine.weights import load_state_dict
from megareuse.engine.metrics import read_metrics
from megareuse.engine.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "train" / "tiny_base.yaml"


def tiny(prepared, out_dir, *extra):
    return load_config(CONFIG, [
        f"data.dir={prepared}", f"run.out_dir={out_dir}", "model.vocab_size=512",
        "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=2",
        "model.ffn_hidden=64", "model.max_seq_len=32", "data.seq_len=32",
        "run.micro_batch_size=4", "run.grad_accum=2", "run.train_tokens=3072",  # 12 steps
        "run.eval_interval=4", "run.eval_tokens=1024", "run.save_interval=100",
        "run.log_interval=100", "run.threads=1", "schedule.warmup_steps=3", *extra])


def train_losses(out_dir):
    return [r["loss"] for r in read_metrics(out_dir) if r["kind"] == "train"]


def eval_records(out_dir):
    return [r for r in read_metrics(out_dir) if r["kind"] == "eval"]


def quiet(_):
    pass


def test_loss_falls_on_prose(prepared, tmp_path):
    cfg = tiny(prepared, tmp_path / "run", "run.train_tokens=20480", "run.grad_accum=1",
               "run.micro_batch_size=8", "run.eval_interval=80", "optim.lr=1e-2", "data.valid=[prose]")
    trainer = Trainer(cfg, emit=quiet)
    before = trainer.evaluate()["prose"]
    summary = trainer.run()
    after = summary["valid_loss"]["prose"]
    assert abs(before - torch.log(torch.tensor(512.0)).item()) < 0.3  # near uniform at init
    assert after < before - 1.0, (before, after)
    assert summary["tokens"] == 80 * 8 * 32 and summary["finished"]


def test_grad_accumulation_equals_large_batch(prepared, tmp_path):
    a = tiny(prepared, tmp_path / "a", "run.train_tokens=768")
    b = tiny(prepared, tmp_path / "b", "run.train_tokens=768", "run.micro_batch_size=8", "run.grad_accum=1")
    Trainer(a, emit=quiet).run()
    Trainer(b, emit=quiet).run()
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(la) == len(lb) == 3
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)


def test_resume_is_bit_identical_and_skips_half_written(prepared, tmp_path):
    full = tmp_path / "full"
    Trainer(tiny(prepared, full), emit=quiet).run()

    part = tmp_path / "part"
    Trainer(tiny(prepared, part), emit=quiet).run(until_step=5)
    root = part / "checkpoints"
    assert [p.name for p in ckpt.step_dirs(root) if ckpt.verify_checkpoint(p) is None] == ["step_00000005"]
    # simulate a crash while writing a later checkpoint: a temp dir and one without manifest
    (root / ".tmp-step_00000009-999").mkdir()
    (root / "step_00000009").mkdir()
    (root / "step_00000009" / "model.safetensors").write_bytes(b"\0" * 100)
    notes = []
    resumed = Trainer(tiny(prepared, part), resume="auto", emit=notes.append)
    assert [n for n in notes if n.startswith("note: skipping checkpoint") and "step_00000009" in n], notes
    assert resumed.state.step == 5 and resumed.state.tokens == 5 * 256
    resumed.run()

    assert train_losses(part) == train_losses(full)  # exact float equality, every step
    assert eval_records(part) == eval_records(full)
    m_full = load_state_dict(full / "checkpoints" / "step_00000012", tied=True)
    m_part = load_state_dict(part / "checkpoints" / "step_00000012", tied=True)
    assert all(torch.equal(m_full[k], m_part[k]) for k in m_full)


def test_checkpoint_metadata(prepared, tmp_path):
    cfg = tiny(prepared, tmp_path / "run")
    Trainer(cfg, emit=quiet).run()
    meta = ckpt.read_meta(tmp_path / "run" / "checkpoints" / "step_00000012")
    assert meta["stage"] == "base" and meta["D1"] == meta["tokens_seen"] == 12 * 256 and meta["D2"] == 0
    assert meta["config"] == cfg.to_dict()
    tok = (Path(prepared) / "tokenizer.model").read_bytes()
    import hashlib
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(tok).hexdigest()
    assert (tmp_path / "run" / "checkpoints" / "step_00000012" / "tokenizer.model").read_bytes() == tok
    assert meta["git_revision"] and meta["samples_consumed"] == 12 * 8


def test_refuses_existing_run_and_other_model_shape(prepared, tmp_path):
    Trainer(tiny(prepared, tmp_path / "run"), emit=quiet).run(until_step=2)
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoint step_00000002; pass --resume"):
        Trainer(tiny(prepared, tmp_path / "run"), emit=quiet)
    with pytest.raises(ckpt.CheckpointError, match="model.n_layers: checkpoint 2 vs config 3"):
        Trainer(tiny(prepared, tmp_path / "run", "model.n_layers=3"), resume="auto", emit=quiet)


def run_cli(*args, cwd):
    env = base_env()  # without the RANK/MASTER_* an in-process run exported
    return subprocess.run([sys.executable, "-m", "megareuse.cli", *args], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override, message", [
    ("model.n_layer=4", "unknown key 'model.n_layer'"),
    ("run.micro_batch_size=-2", "run.micro_batch_size = -2: accepted a positive number"),
    ("data.dir=/nonexistent/prepared", "data.dir = '/nonexistent/prepared' does not exist"),
    ("data.train={poetry: 1}", "names domain 'poetry'"),
])
def test_bad_input_one_line_nonzero_nothing_written(prepared, tmp_path, override, message):
    out = tmp_path / "run"
    proc = run_cli("train", "--config", str(CONFIG), f"data.dir={prepared}", f"run.out_dir={out}",
                   override, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


def test_corrupt_data_file_refused(prepared, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    with open(data / "prose_train.bin", "r+b") as fh:
        fh.truncate(os.path.getsize(data / "prose_train.bin") - 7)
    proc = run_cli("train", "--config", str(CONFIG), f"data.dir={data}",
                   f"run.out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and "prose_train.bin" in proc.stderr and "truncated" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_launch_script_and_cli_resume(prepared, tmp_path):
    out = tmp_path / "run"
    args = ["--config", str(CONFIG), f"data.dir={prepared}", f"run.out_dir={out}",
            "model.vocab_size=512", "run.train_tokens=4096", "run.eval_interval=1",
            "run.eval_tokens=512", "run.threads=1"]
    env = {k: v for k, v in base_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(REPO / "megareuse" / "train.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "step 2/2" in proc.stdout and json.loads(proc.stdout.strip().splitlines()[-1])
    again = run_cli("train", *args, "--resume", cwd=tmp_path)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr


def test_logged_grad_norm_equals_autograd(prepared, tmp_path):
    import copy

    from megareuse.model import cross_entropy
    cfg = tiny(prepared, tmp_path / "run", "run.train_tokens=256", "run.grad_accum=1",
               "run.micro_batch_size=8", "optim.grad_clip=0.01")
    trainer = Trainer(cfg, emit=quiet)
    reference = copy.deepcopy(trainer.model)
    batch = trainer.data.train.batch(0, 8)
    cross_entropy(reference(batch[:, :-1]), batch[:, 1:]).backward()
    norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in reference.parameters())).item()
    trainer.run()
    logged = [r["grad_norm"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert logged == pytest.approx([norm], rel=1e-5)  # the norm before clipping


def test_zero0_single_rank_step_equals_plain_torch_step(prepared, tmp_path):
    """One ZeRO-0 step on one rank (DeepSpeed's gradient all-reduce off, the trainer's foreach
    norm and clip) moves the weights exactly as a hand-written torch step: float64 loss and
    backward, torch's clip_grad_norm_, torch AdamW at the logged learning rate."""
    import copy

    from megareuse.model import cross_entropy
    cfg = tiny(prepared, tmp_path / "run", "run.train_tokens=256", "run.grad_accum=1",
               "run.micro_batch_size=8", "optim.grad_clip=0.01")
    trainer = Trainer(cfg, emit=quiet)
    assert trainer.engine.enable_backward_allreduce is False  # nothing to reduce over one rank
    reference = copy.deepcopy(trainer.model).double()
    batch = trainer.data.train.batch(0, 8)
    trainer.run()
    lr = next(r["lr"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train")
    cross_entropy(reference(batch[:, :-1]), batch[:, 1:]).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    o = cfg.optim
    params = list(reference.parameters())
    torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                      lr=lr, betas=(o.beta1, o.beta2), eps=o.eps).step()
    got = dict(trainer.model.named_parameters())
    for name, want in reference.named_parameters():
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6, msg=name)
