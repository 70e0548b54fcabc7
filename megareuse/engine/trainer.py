"""The training loop: DeepSpeed engine (ZeRO 0-3, accumulation, clipping) over a TP x DP grid.

The same code runs as one plain process or as any number of ranks started by deepspeed,
torchrun, srun or mpirun. Everything that can be wrong with the inputs (config, data directory,
tokenizer, checkpoint to resume) is checked in ``Trainer.__init__`` before anything is written.
Training state is a pure function of (config, samples consumed, engine state), so a run stopped
after step k and resumed from its checkpoint reproduces the uninterrupted run bit for bit (fp32).

Checkpoints hold the consolidated single-device fp32 weights and Adam moments
(model.safetensors, optimizer.safetensors: streamed one tensor at a time, loadable at any TP x DP
x ZeRO layout and by `megareuse evaluate`), DeepSpeed's own sharded engine state (deepspeed/:
exact resume at the same layout), trainer.pt (step, samples, tokens, RNG), meta.json and
manifest.json. No rank builds, loads or saves the whole model: see engine/build.py and
engine/consolidate.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megareuse.config import Config, ConfigError
from megareuse.engine import checkpoint as ckpt
from megareuse.engine import weights
from megareuse.engine.async_save import PendingSave, collect_hashes, publish_hashes, stage_engine_state, write_staged
from megareuse.engine.build import CheckpointWeights, build_model
from megareuse.engine.consolidate import load_full, optimizer_step, stream_full, write_full
from megareuse.engine.ds import deepspeed_config, init_distributed, resolve_device
from megareuse.engine.runlock import RunLock
from megareuse.engine.evaluate import evaluate
from megareuse.engine.guard import DivergenceError, DivergenceGuard, GuardState
from megareuse.engine.inputs import open_training_data, tokenizer_files
from megareuse.engine.loop import StepResult, TrainingLoop, read_steps
from megareuse.engine.metrics import read_metrics, tune_host_allocator
from megareuse.engine.prefetch import Prefetcher
from megareuse.engine.schedule import LRSchedule, StepClock
from megareuse.model import flops_per_token, non_embedding_param_count, param_count
from megareuse.parallel.launch import discover
from megareuse.paths import output_dir_problem
from megareuse.parallel.state import MPU, init_parallel_state
from megareuse.parallel.tensor_parallel import clip_grad_norm_
from megareuse.reuse.cpt import InitSource, model_diff, open_init_source, replay_blend
from megareuse.reuse.records import build_record


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    samples: int = 0  # training samples consumed (all data-parallel ranks together)
    tokens: int = 0  # training tokens consumed in this stage (all ranks together)
    wall_s: float = 0.0  # training wall time, summed over resumed invocations


def _layout(cfg: Config, dp_size: int) -> dict[str, int]:
    return {"tp": cfg.parallel.tp, "dp": dp_size, "zero_stage": cfg.parallel.zero_stage}


def _load_engine_state(engine, path: Path) -> None:
    """DeepSpeed's sharded engine state from checkpoint ``path``. Its files passed their
    checksums, so a file DeepSpeed cannot read was written so (or replaced with its manifest):
    a CheckpointError naming it, not DeepSpeed's traceback (MEGAREUSE_TRACEBACK=1 shows that)."""
    try:
        engine.load_checkpoint(str(path / "deepspeed"), tag="state")
    except Exception as exc:  # noqa: BLE001 - torch.load / pickle / DeepSpeed raise many kinds
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ckpt.CheckpointError(
            f"checkpoint error: {path / 'deepspeed'}: DeepSpeed cannot load its engine state "
            f"({type(exc).__name__}: {first}); accepted a checkpoint written by megareuse "
            f"(delete or move {path.name} to resume from an older one)") from exc


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
    decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
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
        # rank 0 picks the checkpoint (checksumming it once, not once per rank); all ranks agree
        self.resume_from = self._on_rank0(lambda: self._resolve_resume(resume))
        self.state = TrainState()
        self.saved = self._read_saved() if self.resume_from is not None else None  # (trainer, meta)
        self.clock = self._step_clock(cfg.tokens_per_step * self.pstate.dp_size)
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
        self.async_save = self.device.type == "cuda" if cfg.run.async_save is None else cfg.run.async_save
        self.pending_save: Optional[PendingSave] = None
        self.guard = DivergenceGuard(cfg.guard)  # its state comes back with a resumed checkpoint
        self._lock: Optional[RunLock] = None
        self._take_lock()  # one training per run.out_dir, for as long as this one runs
        try:
            self.engine = self._build()
        except BaseException:
            self._release_lock()
            raise

    def _read_saved(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The resumed checkpoint's trainer state and metadata, checked to be of this model and run."""
        # verified with checksums by rank 0 in _resolve_resume; sizes only here
        objs, meta = ckpt.load_checkpoint(self.resume_from, names=("trainer",), checksums=False, config=True)
        diff = model_diff(meta["config"]["model"], asdict(self.cfg.model))
        if diff:
            raise ckpt.CheckpointError(f"run error: checkpoint {self.resume_from} was saved for "
                                       f"another model shape: {'; '.join(diff)}")
        self._check_same_run(meta)
        return objs["trainer"], meta

    def _step_clock(self, tokens_per_step: int) -> StepClock:
        """A fresh run's clock, or the resumed checkpoint's continued at this job's tokens per step
        (engine/schedule.py ``StepClock``: a resume at another DP size, micro-batch or accumulation
        keeps the LR schedule, the budget and the pinned save points where they were in tokens)."""
        if self.saved is None:
            return StepClock.start(tokens_per_step)
        trainer, meta = self.saved
        if "clock" in trainer:
            clock = StepClock.from_list(trainer["clock"])
        else:  # written before the clock was saved: one segment, at the tokens per step it ran
            run, data = meta["config"]["run"], meta["config"]["data"]
            dp = int((meta.get("layout") or {}).get("dp", 1))
            clock = StepClock.start(run["micro_batch_size"] * run["grad_accum"] * data["seq_len"] * dp)
        return clock.resumed(int(trainer["step"]), tokens_per_step)

    def _batch_change_error(self, what: str) -> ckpt.CheckpointError:
        run, ps = self.cfg.run, self.pstate
        before = self.clock.segments[-2][2] if len(self.clock.segments) > 1 else self.tokens_per_step
        return ckpt.CheckpointError(
            f"run error: --resume {self.resume_from}: trained at {before:,} tokens per step, this job "
            f"trains {self.tokens_per_step:,} (run.micro_batch_size {run.micro_batch_size} x run.grad_accum "
            f"{run.grad_accum} x data.seq_len {self.cfg.data.seq_len} x DP {ps.dp_size}); {what} "
            "fall between two of its steps; accepted a micro-batch, accumulation or DP size whose tokens "
            "per step divides them, or the checkpoint's own")

    def _check_same_run(self, meta: dict[str, Any]) -> None:
        """A resumed checkpoint must be of this kind of run: resuming a base run's checkpoint
        with ``run.init_from`` set (or a stage-2 checkpoint of another base) would train one run
        and record it as another, with false D1/D2."""
        theirs = (meta.get("stage", "base"), meta.get("D1") if meta.get("stage", "base") != "base" else None)
        mine = (self.stage, self.D1 if self.stage != "base" else None)
        if theirs != mine:
            def describe(stage: str, d1: Optional[int]) -> str:
                return "a base run" if stage == "base" else f"a {stage} run from a base of D1 = {d1:,} tokens"
            raise ckpt.CheckpointError(
                f"run error: --resume {self.resume_from}: that checkpoint continues {describe(*theirs)}, "
                f"but this config is {describe(*mine)} (run.init_from = {self.cfg.run.init_from!r}); accepted "
                "--resume with this run's own checkpoints, or the run.init_from it was started with")

    def _take_lock(self) -> None:
        def take() -> None:
            if self._lock is None:
                self._lock = RunLock(self.out_dir, self.emit)
        self._on_rank0(take)

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ setup
    def _latest(self) -> Optional[Path]:
        """The newest checkpoint that verifies; each newer broken one is named in a note."""
        broken: list[str] = []
        latest = ckpt.latest_checkpoint(self.ckpt_root, lambda path, problem: broken.append(f"{path}: {problem}"))
        for line in broken if latest is not None else []:  # with none good, the caller says it in one line
            self.emit(f"note: skipping checkpoint {line} (left for inspection)")
        return latest

    def _resolve_resume(self, resume: Optional[str]) -> Optional[Path]:
        if resume is None:
            existing = ckpt.step_dirs(self.ckpt_root)  # verified or not: a fresh start never writes over one
            if existing:
                raise ckpt.CheckpointError(
                    f"run error: run.out_dir = {str(self.out_dir)!r} already holds checkpoint "
                    f"{existing[-1].name}; pass --resume to continue it or choose another run.out_dir")
            return None
        if resume == "auto":
            latest = self._latest()
            broken = ckpt.step_dirs(self.ckpt_root) if latest is None else []
            if broken:  # never restart over checkpoints that exist: they are left for inspection
                raise ckpt.CheckpointError(
                    f"run error: --resume auto: none of the {len(broken)} checkpoints in {self.ckpt_root} "
                    f"verifies (newest {broken[-1].name}: {ckpt.verify_checkpoint(broken[-1])}); they are "
                    "left as they are: accepted --resume with a good checkpoint directory, or another "
                    "run.out_dir to start afresh")
            return latest
        path = Path(resume)
        problem = ckpt.verify_checkpoint(path)
        if problem:
            raise ckpt.CheckpointError(f"run error: --resume {resume!r}: {problem}; accepted 'auto' "
                                       "or a complete checkpoint directory")
        return path

    def _on_rank0(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on global rank 0 only; every rank returns its result or raises its error."""
        if self.pstate.world_size == 1:
            return fn()
        box: list[Any] = [None]
        if self.pstate.rank == 0:
            try:
                box[0] = ("ok", fn())
            except (ckpt.CheckpointError, ConfigError) as exc:
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

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
            self._zero0_clip, engine._config.gradient_clipping = engine.gradient_clipping(), 0.0
        if cfg.parallel.zero_stage == 0 and self.pstate.dp_size == 1:
            # one data-parallel rank: DeepSpeed would still copy every gradient into a flat buffer,
            # all-reduce it over a group of one and copy it back, each step
            engine.enable_backward_allreduce = False
        if self.saved is not None:
            self._restore(engine, *self.saved)
        elif self.init is not None and cfg.run.keep_optimizer:
            self._keep_optimizer(engine)
        if self.init is not None and self.saved is None:
            self.emit(f"stage 2 ({self.method}) from {self.init.path}: D1 = {self.init.D1:,} tokens; "
                      f"optimizer {'carried over' if cfg.run.keep_optimizer else 'fresh'}, "
                      f"lr re-warms to {cfg.optim.lr:g} over {cfg.schedule.warmup_steps} steps")
        return engine

    def _load_layout_free_optimizer(self, engine, path: Path, trainer: Optional[dict[str, Any]] = None) -> bool:
        """Load ``path``'s optimizer.safetensors (any layout); False when it has none."""
        if not (path / weights.OPTIMIZER).is_file():
            return False
        step = int((trainer or ckpt.load_checkpoint(path, names=("trainer",), checksums=False)[0]
                    .get("trainer", {})).get("optimizer_step", 0))
        load_full(engine, engine.module, self.cfg.model, self.pstate,
                  weights.LazyTensors(path / weights.OPTIMIZER), step,
                  weights.open_weights(path, self.cfg.model.tie_embeddings))
        return True

    def _keep_optimizer(self, engine) -> None:
        here, there = _layout(self.cfg, self.pstate.dp_size), self.init.meta.get("layout")
        if there == here and (self.init.path / "deepspeed").is_dir():
            _load_engine_state(engine, self.init.path)
        elif not self._load_layout_free_optimizer(engine, self.init.path):
            raise ckpt.CheckpointError(
                f"run error: run.keep_optimizer needs the base's optimizer state; {self.init.path} has none "
                f"for this layout {here} (saved at {there}) and no {weights.OPTIMIZER}; accepted keep_optimizer=false")

    def _restore(self, engine, trainer: dict[str, Any], meta: dict[str, Any]) -> None:
        path = self.resume_from
        here = _layout(self.cfg, self.pstate.dp_size)
        there = meta.get("layout")
        if there == here and (path / "deepspeed").is_dir():
            _load_engine_state(engine, path)
        elif self._load_layout_free_optimizer(engine, path, trainer):
            self.emit(f"note: {path} was saved at {there}; weights and optimizer state resharded to {here}")
        else:
            self.emit(f"note: {path} was saved at {there} without {weights.OPTIMIZER}; its optimizer state "
                      f"cannot be carried to {here}: the optimizer restarts fresh, the model weights are loaded")
        self._load_trainer_state(trainer)
        self.guard.state = GuardState(**trainer.get("guard", {}))
        self.emit(f"resumed from {path} at step {self.state.step} ({self.state.tokens} tokens)")

    def _load_trainer_state(self, trainer: dict[str, Any]) -> None:
        self.state = TrainState(int(trainer["step"]), int(trainer["samples"]), int(trainer["tokens"]),
                                float(trainer.get("wall_s", 0.0)))
        torch.set_rng_state(trainer["rng_cpu"])
        if torch.cuda.is_available() and "rng_cuda" in trainer:
            torch.cuda.set_rng_state(trainer["rng_cuda"])

    def _rollback(self, from_step: int) -> Path:
        """Reload the last checkpoint's engine state and counters, keep the data cursor (the
        batches since are not replayed) and lower the learning rate (guard.lr_factor)."""
        self.wait_for_saves()
        last = self._on_rank0(self._latest)
        problem = "no checkpoint has been written yet" if last is None else None
        if last is not None:
            objs, meta = ckpt.load_checkpoint(last, names=("trainer",), checksums=False)
            if meta.get("layout") != _layout(self.cfg, self.pstate.dp_size) or not (last / "deepspeed").is_dir():
                problem = f"{last} was saved at another layout ({meta.get('layout')})"
        if problem:
            raise DivergenceError(f"{self.guard.stop_message(from_step)} (no rollback possible: {problem})")
        cursor, wall = self.state.samples, self.state.wall_s
        _load_engine_state(self.engine, last)
        self._load_trainer_state(objs["trainer"])
        self.state.samples, self.state.wall_s = max(cursor, self.state.samples), wall
        self.guard.rolled_back()
        return last

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    def _barrier(self) -> None:
        if dist.is_initialized() and self.pstate.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ metadata and saving
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
            "layout": _layout(cfg, self.pstate.dp_size),
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
        """The run record the law fitter reads (see megareuse/reuse/records.py)."""
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

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """The single-device fp32 weights on rank 0 (None elsewhere), gathered one tensor at a
        time; collective over all ranks. For tests and tools: saving streams to disk instead."""
        full = {k: v for k, v in stream_full(self.engine, self.model, self.cfg.model, self.pstate)}
        if not self.is_main:
            return None
        if self.cfg.model.tie_embeddings:
            full["output.weight"] = full["tok_embeddings.weight"]
        return full

    def save(self) -> Path:
        """Every rank writes its part of DeepSpeed's sharded state in parallel, then the
        layout-free weights and Adam moments are streamed to rank 0's files (hashed while
        written), the ranks fsync and hash their engine files, and rank 0 commits the checkpoint
        atomically. With ``run.async_save`` the engine files are staged in host memory and
        everything after the streamed weights finishes on a background thread (engine/async_save.py);
        the path is returned at once and committed later (``wait_for_saves``)."""
        self.wait_for_saves()
        with ckpt.space_checked(self.ckpt_root, self.state.step):
            return self._save()

    def _save(self) -> Path:
        step, ps = self.state.step, self.pstate
        tmp = ckpt.begin_checkpoint(self.ckpt_root, step) if self.is_main else None
        self._barrier()
        tmp = ckpt.temp_dir(self.ckpt_root, step)
        staged = None
        if self.async_save:
            staged = stage_engine_state(self.engine, tmp / "deepspeed")
        else:
            self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=True)
        known = {}
        mine = (lambda name: tmp / name) if self.is_main else (lambda name: None)
        known[weights.WEIGHTS] = write_full(mine(weights.WEIGHTS), self.engine, self.model, self.cfg.model, ps, False)
        adam_step = optimizer_step(self.engine)
        if adam_step > 0:
            known[weights.OPTIMIZER] = write_full(mine(weights.OPTIMIZER), self.engine, self.model,
                                                  self.cfg.model, ps, True)
        commit = self._committer(tmp, step, known, adam_step)
        if staged is not None:
            self.pending_save = PendingSave(step, lambda: self._finish_in_background(tmp, staged, commit),
                                            self.ckpt_root)
            return ckpt.checkpoint_dir(self.ckpt_root, step)
        self._barrier()  # every rank's engine files are on disk
        engine_files = sorted(p.relative_to(tmp).as_posix() for p in (tmp / "deepspeed").rglob("*") if p.is_file())
        entries = ckpt.hash_files(tmp, engine_files[ps.rank::ps.world_size])
        gathered = [entries]
        if ps.world_size > 1:
            gathered = [None] * ps.world_size if self.is_main else None
            dist.gather_object(entries, gathered, dst=0)
        path = commit([e for part in gathered for e in part.items()]) if self.is_main else \
            ckpt.checkpoint_dir(self.ckpt_root, step)
        self._barrier()
        return path

    def _committer(self, tmp: Path, step: int, known: dict[str, Any], adam_step: int) -> Callable[[list], Path]:
        """Rank 0's last act of a save, with the state of this step captured now: given the
        engine files' manifest entries, write trainer.pt and commit the checkpoint."""
        trainer = {**asdict(self.state), "guard": asdict(self.guard.state), "rng_cpu": torch.get_rng_state(),
                   "optimizer_step": adam_step, "clock": self.clock.to_list()}
        if torch.cuda.is_available():
            trainer["rng_cuda"] = torch.cuda.get_rng_state()
        meta = self.meta() if self.is_main else None

        def commit(engine_entries: list) -> Path:
            files = {**known, **dict(engine_entries)}
            files = {k: {"bytes": v[0], "sha256": v[1]} if isinstance(v, tuple) else v for k, v in files.items()}
            ckpt.write_object(tmp, "trainer.pt", trainer)
            return ckpt.commit_checkpoint(self.ckpt_root, tmp, step, meta, keep_last=self.cfg.run.keep_last,
                                          pinned=self.save_steps, known=files,
                                          extra_files=tokenizer_files(self.data.tokenizer_file))
        return commit

    def _finish_in_background(self, tmp: Path, staged: list, commit: Callable[[list], Path]) -> Optional[Path]:
        """A background save's own part on this rank: write and hash its staged engine files, hand
        the hashes to rank 0; rank 0 then commits (its thread waits for every rank's)."""
        ps = self.pstate
        try:
            written = write_staged(staged)
            entries = ckpt.hash_files(tmp, [p.relative_to(tmp).as_posix() for p in written])
        except BaseException as exc:
            publish_hashes(tmp, ps.rank, {"error": f"{type(exc).__name__}: {exc}"[:300]})
            raise
        publish_hashes(tmp, ps.rank, entries)
        if not self.is_main:
            return None
        path = commit(list(collect_hashes(tmp, ps.world_size, self.cfg.parallel.timeout_s).items()))
        self.emit(f"saved {path} (finished in the background)")
        return path

    def wait_for_saves(self, collective: bool = True) -> None:
        """Wait for the checkpoint finishing in the background, if any, and raise its error. The
        ranks agree on the outcome (``collective``; not on a way out where one rank alone is)."""
        pending, self.pending_save = self.pending_save, None
        if pending is None:
            return
        error: Optional[BaseException] = None
        try:
            pending.wait(self.cfg.parallel.timeout_s)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the ranks agree
            error = exc
        if collective and self.pstate.world_size > 1:
            failed = torch.tensor([int(error is not None)], device="cpu")  # host: the group's gloo side
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if int(failed) and error is None:
                error = ckpt.CheckpointError(f"checkpoint error: another rank's background write of step "
                                             f"{pending.step} failed (rank 0 names it)")
        if error is not None:
            raise error

    # ------------------------------------------------------------------ loop
    def run(self, until_step: Optional[int] = None) -> dict[str, Any]:
        """Train to the end (or stop after ``until_step``); see ``TrainingLoop.run``. The run
        directory's lock is held meanwhile and released on every way out."""
        self._take_lock()
        try:
            return TrainingLoop(self).run(until_step)  # it waits for the last save before the summary
        except BaseException:
            try:  # one rank may be alone on this way out: no collective
                self.wait_for_saves(collective=False)
            except BaseException as exc:  # noqa: BLE001 - the first error is the one to report
                self.emit(f"note: the checkpoint being written in the background failed too: {exc}")
            raise
        finally:
            if self._prefetch is not None:
                self._prefetch.close()
            self._release_lock()

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
