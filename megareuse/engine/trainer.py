"""The training loop: DeepSpeed engine (ZeRO 0-3, accumulation, clipping) over a TP x DP grid.

The same code runs as one plain process or as any number of ranks started by deepspeed,
torchrun, srun or mpirun. Everything that can be wrong with the inputs (config, data directory,
tokenizer, checkpoint to resume) is checked in ``Trainer.__init__`` before anything is written.
Training state is a pure function of (config, samples consumed, engine state), so a run stopped
after step k and resumed from its checkpoint reproduces the uninterrupted run bit for bit (fp32).

Checkpoints: engine/checkpointer.py.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megareuse.config import Config, ConfigError
from megareuse.engine import checkpoint as ckpt
from megareuse.engine import weights
from megareuse.engine.build import CheckpointWeights, build_model
from megareuse.engine.checkpointer import Checkpointer, TrainState, layout, resumed_clock
from megareuse.engine.ds import deepspeed_config, init_distributed, resolve_device
from megareuse.engine.ds_internals import measure_clipping_outside, param_shape, skip_gradient_allreduce
from megareuse.engine.evaluate import evaluate
from megareuse.engine.guard import DivergenceGuard
from megareuse.engine.inputs import open_training_data, tokenizer_files
from megareuse.engine.loop import StepResult, TrainingLoop, read_steps
from megareuse.engine.metrics import read_metrics, tune_host_allocator
from megareuse.engine.prefetch import Prefetcher
from megareuse.engine.schedule import LRSchedule
from megareuse.model import flops_per_token, non_embedding_param_count, param_count
from megareuse.parallel.launch import discover
from megareuse.paths import output_dir_problem
from megareuse.parallel.state import MPU, init_parallel_state
from megareuse.parallel.tensor_parallel import clip_grad_norm_
from megareuse.engine.init_source import InitSource, open_init_source, replay_blend
from megareuse.records import build_record


ckpt.git_revision()  # fixed at import: the revision of the code this process runs


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next ``step()`` can be declined: at ZeRO-0 DeepSpeed has no overflow check of
    its own, so the trainer declines the update of a step whose gradient norm is not finite (the
    engine still zeroes the gradients and counts the step). ZeRO 1-3 skip such steps themselves.

    The fused kernel takes the decision as a device tensor (``found_inf``, as torch's GradScaler
    hands it over): an update is declined without the host waiting for the gradient norm."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip_next: Optional[torch.Tensor] = None

    def skip_next_step_if(self, not_finite: torch.Tensor) -> None:
        self._skip_next = not_finite

    def step(self, closure=None):
        skip, self._skip_next = self._skip_next, None
        if skip is None:
            return super().step(closure)
        if not self.defaults.get("fused"):  # the foreach/for-loop kernels take no found_inf: decide here
            return None if bool(skip) else super().step(closure)
        self.found_inf = skip.float()
        try:
            return super().step(closure)
        finally:
            del self.found_inf


def make_optimizer(model: torch.nn.Module, o, device: torch.device) -> SkippableAdamW:
    """AdamW with weight decay on matrices only (norm gains excluded); torch's fused kernel."""
    params = list(model.parameters())
    decay = [p for p in params if len(param_shape(p)) >= 2]
    no_decay = [p for p in params if len(param_shape(p)) < 2]
    return SkippableAdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type in ("cpu", "cuda"))


class Trainer:
    """One training stage: inputs checked, engine built (resumed or initialised), steps,
    evaluation and checkpoints; ``run`` hands it to ``TrainingLoop`` (the loop and its
    reliability policy, engine/loop.py)."""

    def __init__(self, cfg: Config, resume: Optional[str] = None,
                 emit: Callable[[str], None] = lambda s: print(s, flush=True)):
        cfg.validate()
        self.cfg = cfg
        self.out_dir = Path(cfg.run.out_dir)
        problem = output_dir_problem(self.out_dir)
        if problem is not None:
            raise ConfigError(f"config error: run.out_dir = {cfg.run.out_dir!r} {problem}; accepted a "
                              "writable directory (created if missing)")
        self.ckpt_root = self.out_dir / "checkpoints"
        problem = output_dir_problem(self.ckpt_root)
        if problem is not None:  # found now, not at the first save
            raise ConfigError(f"config error: {self.ckpt_root} (run.out_dir's checkpoint directory) {problem}; "
                              "accepted a writable directory (created if missing)")
        # checks that need no process group come first: a bad input writes nothing
        launch = discover()
        self.data = open_training_data(cfg.data, cfg.model)
        self.init: Optional[InitSource] = None
        if cfg.run.init_from is not None:  # stage 2: continual pretraining or after growth
            self.init = open_init_source(cfg.run.init_from, cfg, self.data.tokenizer.sha256)
            if cfg.data.replay:
                weights = replay_blend(cfg.data.train, cfg.data.replay, self.init.base_train)
                self.data = open_training_data(cfg.data, cfg.model, weights)
        self.stage = "base" if self.init is None else self.init.stage
        self.method = "base" if self.init is None else self.init.method
        init_distributed(launch, cfg.parallel.backend, cfg.parallel.timeout_s)
        try:
            self.pstate = init_parallel_state(cfg.parallel.tp, cfg.parallel.timeout_s)
        except ValueError as exc:
            raise ConfigError(f"config error: parallel.tp = {cfg.parallel.tp}: {exc}") from None
        self.is_main = self.pstate.rank == 0
        self.emit = emit if self.is_main else (lambda s: None)
        self.device = resolve_device(cfg.run.device, launch.local_rank)
        self.checkpointer = Checkpointer(cfg, self.out_dir, self.ckpt_root, self.pstate, self.emit, self.device,
                                         self.data.tokenizer_file)
        self.resume_from = self.checkpointer.resolve(resume)
        self.state = TrainState()
        self.saved = None if self.resume_from is None else \
            self.checkpointer.read(self.resume_from, self.init)  # (trainer, meta)
        self.clock = resumed_clock(self.saved, cfg.tokens_per_step * self.pstate.dp_size)
        self.tokens_per_step = self.clock.tokens_per_step
        base = self.clock.base_tokens_per_step
        budget = cfg.run.train_tokens // base * base  # the tokens the run trains, fixed at its start
        if budget < 1:
            raise ConfigError(f"config error: run.train_tokens = {cfg.run.train_tokens}: accepted at "
                             f"least one step of {self.tokens_per_step} tokens at DP={self.pstate.dp_size}")
        self.total_steps = self.clock.step_of(budget)
        if self.total_steps is None:
            left = budget - self.clock.segments[-1][1]  # tokens after the step this job resumes at
            raise self._batch_change_error(f"the {left:,} tokens left of run.train_tokens")
        self.schedule = LRSchedule.from_config(cfg.schedule, cfg.optim.lr, budget // base)
        bad = [t for t in cfg.run.save_tokens if self.clock.step_of(t) is None]
        if bad and len(self.clock.segments) > 1:  # a resume at another batch
            raise self._batch_change_error(f"run.save_tokens = {bad}")
        if bad:
            raise ConfigError(f"config error: run.save_tokens = {bad}: accepted multiples of the "
                              f"{self.tokens_per_step} tokens of one step")
        self.save_steps = frozenset(self.clock.step_of(t) for t in cfg.run.save_tokens)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if self.pstate.world_size > 1:  # sharded ranks stream tensors; one process holds the model anyway
            tune_host_allocator()
        prefetch = self.device.type == "cuda" if cfg.run.prefetch is None else cfg.run.prefetch
        self._prefetch = Prefetcher(self.data.train, cfg.run.micro_batch_size,
                                    cfg.run.micro_batch_size * self.pstate.dp_size, self.device) if prefetch else None
        self.guard = DivergenceGuard(cfg.guard)  # its state comes back with a resumed checkpoint
        self.checkpointer.lock()  # one training per run.out_dir, for as long as this one runs
        try:
            self.engine = self._build()
        except BaseException:
            self.checkpointer.close()
            raise

    def _batch_change_error(self, what: str) -> ckpt.CheckpointError:
        run, ps = self.cfg.run, self.pstate
        before = self.clock.segments[-2][2] if len(self.clock.segments) > 1 else self.tokens_per_step
        return ckpt.CheckpointError(
            f"run error: --resume {self.resume_from}: trained at {before:,} tokens per step, this job "
            f"trains {self.tokens_per_step:,} (run.micro_batch_size {run.micro_batch_size} x run.grad_accum "
            f"{run.grad_accum} x data.seq_len {self.cfg.data.seq_len} x DP {ps.dp_size}); {what} "
            "fall between two of its steps; accepted a micro-batch, accumulation or DP size whose tokens "
            "per step divides them, or the checkpoint's own")

    def _build(self):
        """The build as separate steps: weights source -> this rank's shard of the model ->
        optimizer -> engine -> engine/optimizer state."""
        import deepspeed

        cfg = self.cfg
        ds_config = deepspeed_config(cfg, self.pstate.dp_size)
        source_dir = self.resume_from if self.resume_from is not None else (self.init.path if self.init else None)
        torch.manual_seed(cfg.run.seed)
        source = None if source_dir is None else CheckpointWeights(
            weights.open_weights(source_dir, cfg.model.tie_embeddings, cfg.model))
        model = build_model(cfg.model, self.pstate, self.device, source, seed=cfg.run.seed,
                            zero3_config=ds_config if cfg.parallel.zero_stage == 3 else None,
                            dtype=torch.bfloat16 if cfg.run.dtype == "bf16" else torch.float32)
        if cfg.model.compile:
            model.compile_blocks()
        self.optimizer = make_optimizer(model, cfg.optim, self.device)
        engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, mpu=MPU(self.pstate),
                                          config=ds_config)
        self._zero0_clip = math.inf  # max_norm of the ZeRO-0 norm the trainer measures (inf: measure only)
        if cfg.parallel.zero_stage == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled()) \
                and engine.gradient_clipping() > 0:
            # that measurement clips too (the same formula DeepSpeed's own clipping applies after it):
            # one pass over the gradients for the norm, not two
            self._zero0_clip = measure_clipping_outside(engine)
        if cfg.parallel.zero_stage == 0 and self.pstate.dp_size == 1:
            # one data-parallel rank: DeepSpeed would still copy every gradient into a flat buffer,
            # all-reduce it over a group of one and copy it back, each step
            skip_gradient_allreduce(engine)
        if self.saved is not None:
            self.state = self.checkpointer.restore(engine, self.resume_from, *self.saved, self.guard)
        elif self.init is not None and cfg.run.keep_optimizer:
            self.checkpointer.keep_optimizer(engine, self.init)
        if self.init is not None and self.saved is None:
            self.emit(f"stage 2 ({self.method}) from {self.init.path}: D1 = {self.init.D1:,} tokens; "
                      f"optimizer {'carried over' if cfg.run.keep_optimizer else 'fresh'}, "
                      f"lr re-warms to {cfg.optim.lr:g} over {cfg.schedule.warmup_steps} steps")
        return engine

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    # ------------------------------------------------------------------ metadata and checkpoints
    def meta(self) -> dict[str, Any]:
        cfg, tok = self.cfg, self.data.tokenizer
        return {
            "stage": self.stage,
            "method": self.method,
            "tokens_seen": self.state.tokens,
            "D1": self.D1,
            "D2": self.D2,
            "init_from": None if self.init is None else self.init.describe(),
            "samples_consumed": self.state.samples,
            "total_steps": self.total_steps,
            "params": param_count(cfg.model),
            "non_embedding_params": non_embedding_param_count(cfg.model),
            "config": cfg.to_dict(),
            "layout": layout(cfg, self.pstate.dp_size),
            "tokenizer": {"file": next(iter(tokenizer_files(self.data.tokenizer_file))), "source": str(Path(tok.path).resolve()),
                          "sha256": tok.sha256, "vocab_size": tok.vocab_size},
            "git_revision": ckpt.git_revision(),
            "torch_version": torch.__version__,
            "world_size": self.pstate.world_size,
        }

    @property
    def D1(self) -> int:
        """Tokens the base model saw: this run's tokens for a base run, else the base's."""
        return self.state.tokens if self.init is None else self.init.D1

    @property
    def D2(self) -> int:
        return 0 if self.init is None else self.state.tokens

    def record(self, checkpoint: Path) -> dict[str, Any]:
        """The run record the law fitter reads (see megareuse/records.py)."""
        cfg = self.cfg
        samples = self.data.samples_per_domain(self.state.samples)
        return build_record(
            run_id=self.out_dir.name, series=cfg.run.series or self.method, stage=self.stage, method=self.method,
            n_params=non_embedding_param_count(cfg.model), n_total=param_count(cfg.model),
            d1=self.D1, d2=self.D2, tokens=self.state.tokens,
            tokens_per_domain={d: n * cfg.data.seq_len for d, n in samples.items()},
            history=[r for r in read_metrics(self.out_dir) if r.get("kind") == "eval"],
            wall_s=self.state.wall_s, flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
            config=cfg.to_dict(), out_dir=self.out_dir, checkpoint=checkpoint,
            init_from=None if self.init is None else self.init.describe())

    def save(self) -> Path:
        """Checkpoint this step (``Checkpointer.save``: with run.async_save it is committed later)."""
        return self.checkpointer.save(self.engine, self.state, self.guard, self.clock, self.meta, self.save_steps)

    def rollback(self, from_step: int) -> Path:
        """Back to the last checkpoint, keeping the data cursor (``Checkpointer.rollback``)."""
        path, self.state = self.checkpointer.rollback(self.engine, self.state, self.guard, from_step)
        return path

    # ------------------------------------------------------------------ loop
    def run(self, until_step: Optional[int] = None) -> dict[str, Any]:
        """Train to the end (or stop after ``until_step``); see ``TrainingLoop.run``. The run
        directory's lock is held meanwhile and released on every way out."""
        self.checkpointer.lock()
        try:
            return TrainingLoop(self).run(until_step)  # it waits for the last save before the summary
        except BaseException:
            try:  # one rank may be alone on this way out: no collective
                self.checkpointer.wait(collective=False)
            except BaseException as exc:  # noqa: BLE001 - the first error is the one to report
                self.emit(f"note: the checkpoint being written in the background failed too: {exc}")
            raise
        finally:
            if self._prefetch is not None:
                self._prefetch.close()
            self.checkpointer.close()

    def batch_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of a batch [B, T+1]; the model's head computes it (model.loss:
        chunked / fused / plain, vocab-parallel under TP) so no [B, T, V] logits need exist."""
        return self.engine(batch[:, :-1], batch[:, 1:])

    def train_step(self) -> StepResult:
        """One optimizer step: (mean loss, lr, gradient norm before clipping, applied?).

        A step whose gradient norm is not finite is not applied: ZeRO 1-3 skip it themselves
        (DeepSpeed's overflow check); at ZeRO-0 the norm is measured before the engine steps
        and the fused optimizer declines the update on the device. Data and step counters
        advance either way. Nothing here waits for the device: loss, norm and the applied flag
        come back as tensors, read by the loop at its log, eval and save steps."""
        run, ps = self.cfg.run, self.pstate
        lr = self.schedule(self.clock.schedule_step(self.state.step)) * self.guard.state.lr_scale
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        losses = None
        norm_before_step, skipped_before, finite = None, self.engine.skipped_steps, True
        for micro in range(run.grad_accum):
            batch = self._batch(self.state.samples + ps.dp_rank * run.micro_batch_size)
            loss = self.batch_loss(batch)
            self.engine.backward(loss)
            if micro == run.grad_accum - 1 and self.cfg.parallel.zero_stage == 0:
                # ZeRO-0 clips without keeping the norm: measure it (TP-aware) and, in fp32, clip here
                norm_before_step = clip_grad_norm_(self.engine.module.parameters(), self._zero0_clip,
                                                   self.pstate).reshape(())
                finite = torch.isfinite(norm_before_step)
                self.optimizer.skip_next_step_if(~finite)
            self.engine.step()
            losses = loss.detach().double() if losses is None else losses + loss.detach().double()
            self.state.samples += run.micro_batch_size * ps.dp_size
        if ps.dp_size > 1:
            dist.all_reduce(losses, group=ps.dp_group)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = norm_before_step if grad_norm is None else grad_norm
        self.state.step += 1
        self.state.tokens += self.tokens_per_step
        applied = finite & (self.engine.skipped_steps == skipped_before)
        result = StepResult(losses / (run.grad_accum * ps.dp_size), lr,
                            float("nan") if grad_norm is None else grad_norm, applied)
        return StepResult(*read_steps([result])[0]) if run.sync_every_step else result

    def _batch(self, first: int) -> torch.Tensor:
        """Micro-batch of global samples ``first ..`` on the device (prefetched when run.prefetch is on)."""
        if self._prefetch is None:
            return self.data.train.batch(first, self.cfg.run.micro_batch_size).to(self.device)
        return self._prefetch.get(first)

    def evaluate(self) -> dict[str, float]:
        run, ps = self.cfg.run, self.pstate
        self.engine.eval()
        try:
            return {domain: evaluate(self.batch_loss, ds, run.eval_tokens, run.micro_batch_size,
                                     self.device, ps.dp_rank, ps.dp_size, ps.dp_group)
                    for domain, ds in self.data.valid.items()}
        finally:
            self.engine.train()
