"""Single-process training loop: AdamW, accumulation, clipping, schedules, eval, checkpoints.

Everything that can be wrong with the inputs (config, data directory, tokenizer, checkpoint to
resume) is checked in ``Trainer.__init__`` before anything is written. Training state is a
pure function of (config, samples consumed, optimizer state), so a run stopped after step k
and resumed from its checkpoint reproduces the uninterrupted run bit for bit (fp32).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megareuse.config import Config
from megareuse.engine import checkpoint as ckpt
from megareuse.engine.evaluate import evaluate
from megareuse.engine.inputs import open_training_data
from megareuse.engine.metrics import MetricsLog, Progress, format_duration
from megareuse.engine.schedule import LRSchedule
from megareuse.model import GPT, cross_entropy, flops_per_token, non_embedding_param_count, param_count

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    samples: int = 0  # training samples consumed
    tokens: int = 0  # training tokens consumed in this stage


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config error: run.device = 'cuda' but no CUDA device is available; "
                         "accepted cpu or auto here")
    return torch.device(name)


def peak_flops(device: torch.device, configured_tflops: float) -> float:
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)
    return 0.0


def _model_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"model.{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
            for k, v in current.items() if saved.get(k) != v]


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None,
                 emit: Callable[[str], None] = lambda s: print(s, flush=True)):
        cfg.validate()
        self.cfg, self.emit = cfg, emit
        self.out_dir = Path(cfg.run.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.device = resolve_device(cfg.run.device)
        self.data = open_training_data(cfg.data, cfg.model)
        self.resume_from = self._resolve_resume(resume)
        self.total_steps = cfg.run.train_tokens // cfg.tokens_per_step
        self.schedule = LRSchedule.from_config(cfg.schedule, cfg.optim.lr, self.total_steps)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.state = TrainState()
        torch.manual_seed(cfg.run.seed)
        self.model = GPT(cfg.model).to(self.device)
        self.optimizer = self._make_optimizer()
        if self.resume_from is not None:
            self._load(self.resume_from)

    # ------------------------------------------------------------------ setup
    def _resolve_resume(self, resume: Optional[str]) -> Optional[Path]:
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if resume is None:
            if latest is not None:
                raise ckpt.CheckpointError(
                    f"run error: run.out_dir = {str(self.out_dir)!r} already holds checkpoint "
                    f"{latest.name}; pass --resume to continue it or choose another run.out_dir")
            return None
        if resume == "auto":
            return latest
        path = Path(resume)
        problem = ckpt.verify_checkpoint(path) if path.is_dir() else "no such directory"
        if problem:
            raise ckpt.CheckpointError(f"run error: --resume {resume!r}: {problem}; accepted 'auto' "
                                       "or a complete checkpoint directory")
        return path

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                 fused=self.device.type in ("cpu", "cuda"))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.run.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _load(self, path: Path) -> None:
        objs, meta = ckpt.load_checkpoint(path, map_location=self.device)
        diff = _model_diff(meta["config"]["model"], asdict(self.cfg.model))
        if diff:
            raise ckpt.CheckpointError(f"run error: checkpoint {path} was saved for another model "
                                       f"shape: {'; '.join(diff)}")
        self.model.load_state_dict(objs["model"])
        self.optimizer.load_state_dict(objs["optimizer"])
        trainer = objs["trainer"]
        self.state = TrainState(int(trainer["step"]), int(trainer["samples"]), int(trainer["tokens"]))
        torch.set_rng_state(trainer["rng_cpu"])
        if torch.cuda.is_available() and "rng_cuda" in trainer:
            torch.cuda.set_rng_state(trainer["rng_cuda"])
        self.emit(f"resumed from {path} at step {self.state.step} ({self.state.tokens} tokens)")

    # ------------------------------------------------------------------ metadata
    def meta(self) -> dict[str, Any]:
        cfg, tok = self.cfg, self.data.tokenizer
        return {
            "stage": cfg.run.stage,
            "tokens_seen": self.state.tokens,
            "D1": self.state.tokens if cfg.run.stage == "base" else None,
            "D2": 0 if cfg.run.stage == "base" else self.state.tokens,
            "samples_consumed": self.state.samples,
            "total_steps": self.total_steps,
            "params": param_count(cfg.model),
            "non_embedding_params": non_embedding_param_count(cfg.model),
            "config": cfg.to_dict(),
            "tokenizer": {"file": "tokenizer.model", "source": str(Path(tok.path).resolve()),
                          "sha256": tok.sha256, "vocab_size": tok.vocab_size},
            "git_revision": ckpt.git_revision(),
            "torch_version": torch.__version__,
            "world_size": 1,
        }

    def save(self) -> Path:
        trainer = {**asdict(self.state), "rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            trainer["rng_cuda"] = torch.cuda.get_rng_state()
        path = ckpt.save_checkpoint(
            self.ckpt_root, self.state.step,
            {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "trainer": trainer},
            self.meta(), keep_last=self.cfg.run.keep_last,
            extra_files={"tokenizer.model": Path(self.data.tokenizer.path)})
        return path

    # ------------------------------------------------------------------ loop
    def train_step(self) -> tuple[float, float, float]:
        run = self.cfg.run
        lr = self.schedule(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(run.grad_accum):
            batch = self.data.train.batch(self.state.samples, run.micro_batch_size).to(self.device)
            with self._autocast():
                loss = cross_entropy(self.model(batch[:, :-1]), batch[:, 1:])
            (loss / run.grad_accum).backward()
            loss_sum += float(loss.detach())
            self.state.samples += run.micro_batch_size
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens += self.cfg.tokens_per_step
        return loss_sum / run.grad_accum, lr, grad_norm

    def evaluate(self) -> dict[str, float]:
        run = self.cfg.run
        return {domain: evaluate(self.model, ds, run.eval_tokens, run.micro_batch_size,
                                 self.device, self._autocast)
                for domain, ds in self.data.valid.items()}

    def run(self, until_step: Optional[int] = None) -> dict[str, Any]:
        """Train to the end (or stop after ``until_step``, saving a checkpoint there)."""
        cfg, run = self.cfg, self.cfg.run
        stop = self.total_steps if until_step is None else min(until_step, self.total_steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log = MetricsLog(self.out_dir)
        log.truncate_after(self.state.step)
        fpt = flops_per_token(cfg.model, cfg.data.seq_len)
        progress = Progress(self.total_steps, cfg.tokens_per_step, fpt,
                            peak_flops(self.device, run.peak_tflops), self.emit)
        self.emit(f"training {param_count(cfg.model):,} parameters "
                  f"({non_embedding_param_count(cfg.model):,} non-embedding) for {self.total_steps} "
                  f"steps x {cfg.tokens_per_step} tokens on {self.device} ({run.dtype})")
        t_start, last_eval = time.perf_counter(), {}
        progress.start(self.state.step)
        self.model.train()
        while self.state.step < stop:
            loss, lr, grad_norm = self.train_step()
            step = self.state.step
            if not math.isfinite(loss):
                raise FloatingPointError(f"training diverged: loss {loss} at step {step}")
            record = {"kind": "train", "step": step, "tokens": self.state.tokens, "loss": loss,
                      "lr": lr, "grad_norm": grad_norm}
            last = step == self.total_steps
            if step % run.log_interval == 0 or last or step == stop:
                record.update(progress.line(step, loss, lr))
            log.write(record)
            if step % run.eval_interval == 0 or last:
                last_eval = self.evaluate()
                log.write({"kind": "eval", "step": step, "tokens": self.state.tokens,
                           **{f"valid_loss/{d}": v for d, v in last_eval.items()}})
                self.emit(f"eval step {step}: " + ", ".join(f"{d} {v:.4f}" for d, v in last_eval.items()))
            if step % run.save_interval == 0 or last or step == stop:
                path = self.save()
                self.emit(f"saved {path}")
        log.close()
        wall = time.perf_counter() - t_start
        summary = {"steps": self.state.step, "total_steps": self.total_steps,
                   "tokens": self.state.tokens, "valid_loss": last_eval, "wall_s": wall,
                   "finished": self.state.step >= self.total_steps,
                   "checkpoint": str(ckpt.latest_checkpoint(self.ckpt_root))}
        if summary["finished"]:
            tmp = self.out_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, self.out_dir / "summary.json")
            self.emit(f"done: {self.state.tokens:,} tokens in {format_duration(wall)}")
        return summary
