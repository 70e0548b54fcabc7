"""The trainer's checkpoint manager: which checkpoint to resume, restoring it, saving, waiting
for a save finishing in the background, rolling back, and the run directory's lock.

``Trainer`` (engine/trainer.py) builds one and hands it the engine and its counters at each
call; the loop (engine/loop.py) waits on it and syncs the ranks through it. The on-disk format
is engine/checkpoint.py's; the background part of a save is engine/async_save.py's.

Checkpoints hold the consolidated single-device fp32 weights and Adam moments
(model.safetensors, optimizer.safetensors: streamed one tensor at a time, loadable at any TP x DP
x ZeRO layout and by `megareuse evaluate`), DeepSpeed's own sharded engine state (deepspeed/:
exact resume at the same layout), trainer.pt (step, samples, tokens, RNG), meta.json and
manifest.json. No rank builds, loads or saves the whole model: see engine/build.py and
engine/consolidate.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megareuse.config import Config, ConfigError
from megareuse.engine import checkpoint as ckpt
from megareuse.engine import weights
from megareuse.engine import fragments, sharded
from megareuse.engine.async_save import PendingSave, collect_hashes, publish_hashes
from megareuse.engine.consolidate import load_full, stream_full
from megareuse.engine.ds_internals import load_engine_state, optimizer_step
from megareuse.engine.guard import DivergenceError, DivergenceGuard, GuardState
from megareuse.engine.inputs import tokenizer_files
from megareuse.engine.runlock import RunLock
from megareuse.engine.schedule import StepClock
from megareuse.parallel.state import ParallelState
from megareuse.engine.init_source import InitSource, model_diff


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    samples: int = 0  # training samples consumed (all data-parallel ranks together)
    tokens: int = 0  # training tokens consumed in this stage (all ranks together)
    wall_s: float = 0.0  # training wall time, summed over resumed invocations


def layout(cfg: Config, dp_size: int) -> dict[str, int]:
    return {"tp": cfg.parallel.tp, "dp": dp_size, "zero_stage": cfg.parallel.zero_stage}


def load_trainer_state(trainer: dict[str, Any]) -> TrainState:
    """trainer.pt's counters; the RNG states it holds are set."""
    state = TrainState(int(trainer["step"]), int(trainer["samples"]), int(trainer["tokens"]),
                       float(trainer.get("wall_s", 0.0)))
    torch.set_rng_state(trainer["rng_cpu"])
    if torch.cuda.is_available() and "rng_cuda" in trainer:
        torch.cuda.set_rng_state(trainer["rng_cuda"])
    return state


def resumed_clock(saved: Optional[tuple[dict[str, Any], dict[str, Any]]], tokens_per_step: int) -> StepClock:
    """A fresh run's clock, or the resumed checkpoint's continued at this job's tokens per step
    (engine/schedule.py ``StepClock``: a resume at another DP size, micro-batch or accumulation
    keeps the LR schedule, the budget and the pinned save points where they were in tokens).
    ``saved``: the resumed checkpoint's (trainer state, metadata) (``Checkpointer.read``)."""
    if saved is None:
        return StepClock.start(tokens_per_step)
    trainer, meta = saved
    if "clock" in trainer:
        clock = StepClock.from_list(trainer["clock"])
    else:  # written before the clock was saved: one segment, at the tokens per step it ran
        run, data = meta["config"]["run"], meta["config"]["data"]
        dp = int((meta.get("layout") or {}).get("dp", 1))
        clock = StepClock.start(run["micro_batch_size"] * run["grad_accum"] * data["seq_len"] * dp)
    return clock.resumed(int(trainer["step"]), tokens_per_step)


class Checkpointer:
    """Saving and restoring for one training stage, on every rank (rank 0 commits)."""

    def __init__(self, cfg: Config, out_dir: Path, root: Path, pstate: ParallelState,
                 emit: Callable[[str], None], device: torch.device, tokenizer_file: Path):
        self.cfg, self.out_dir, self.root, self.pstate, self.emit = cfg, out_dir, root, pstate, emit
        self.is_main = pstate.rank == 0
        self.tokenizer_file = tokenizer_file
        self.async_save = device.type == "cuda" if cfg.run.async_save is None else cfg.run.async_save
        self.pending: Optional[PendingSave] = None
        self._lock: Optional[RunLock] = None

    # ------------------------------------------------------------------ ranks and the run lock
    def on_rank0(self, fn: Callable[[], Any]) -> Any:
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

    def barrier(self) -> None:
        if dist.is_initialized() and self.pstate.world_size > 1:
            dist.barrier()

    def lock(self) -> None:
        """One training per run.out_dir (rank 0 holds the lock), until ``close``."""
        def take() -> None:
            if self._lock is None:
                self._lock = RunLock(self.out_dir, self.emit)
        self.on_rank0(take)

    def close(self) -> None:
        """Release the run directory's lock (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ resume
    def _latest(self) -> Optional[Path]:
        """The newest checkpoint that verifies; each newer broken one is named in a note."""
        broken: list[str] = []
        latest = ckpt.latest_checkpoint(self.root, lambda path, problem: broken.append(f"{path}: {problem}"))
        for line in broken if latest is not None else []:  # with none good, the caller says it in one line
            self.emit(f"note: skipping checkpoint {line} (left for inspection)")
        return latest

    def _verify(self, path: Path) -> Optional[str]:
        """None when checkpoint ``path`` is complete and passes its checksums, else why not; with
        several ranks each hashes its share of the files (collective)."""
        if self.pstate.world_size == 1:
            return ckpt.verify_checkpoint(path)
        return ckpt.verify_checkpoint_shared(path, self.pstate.rank, self.pstate.world_size)

    def resolve(self, resume: Optional[str]) -> Optional[Path]:
        """The checkpoint ``--resume`` names (None: a fresh start), checked (checksums included)
        by all ranks together; all ranks agree."""
        if resume is None:
            self.on_rank0(self._fresh_start)
            return None
        if resume != "auto":
            path = Path(resume)
            problem = self._verify(path)
            if problem:
                raise ckpt.CheckpointError(f"run error: --resume {resume!r}: {problem}; accepted 'auto' "
                                           "or a complete checkpoint directory")
            return path
        candidates = self.on_rank0(lambda: [str(p) for p in ckpt.step_dirs(self.root)])
        broken: list[str] = []
        for candidate in map(Path, reversed(candidates)):
            problem = self._verify(candidate)
            if problem is None:
                for line in broken:  # the newer broken ones, left for inspection
                    self.emit(f"note: skipping checkpoint {line} (left for inspection)")
                return candidate
            broken.append(f"{candidate}: {problem}")
        if broken:  # never restart over checkpoints that exist: they are left for inspection
            newest = Path(candidates[-1])
            raise ckpt.CheckpointError(
                f"run error: --resume auto: none of the {len(candidates)} checkpoints in {self.root} "
                f"verifies (newest {newest.name}: {broken[0].split(': ', 1)[1]}); they are "
                "left as they are: accepted --resume with a good checkpoint directory, or another "
                "run.out_dir to start afresh")
        return None

    def _fresh_start(self) -> None:
        existing = ckpt.step_dirs(self.root)  # verified or not: a fresh start never writes over one
        if existing:
            raise ckpt.CheckpointError(
                f"run error: run.out_dir = {str(self.out_dir)!r} already holds checkpoint "
                f"{existing[-1].name}; pass --resume to continue it or choose another run.out_dir")

    def read(self, path: Path, init: Optional[InitSource]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The resumed checkpoint's trainer state and metadata, checked to be of this model and run."""
        # verified with checksums by rank 0 in resolve; sizes only here
        objs, meta = ckpt.load_checkpoint(path, names=("trainer",), checksums=False, config=True)
        diff = model_diff(meta["config"]["model"], asdict(self.cfg.model))
        if diff:
            raise ckpt.CheckpointError(f"run error: checkpoint {path} was saved for "
                                       f"another model shape: {'; '.join(diff)}")
        self._check_same_run(path, meta, init)
        return objs["trainer"], meta

    def _check_same_run(self, path: Path, meta: dict[str, Any], init: Optional[InitSource]) -> None:
        """A resumed checkpoint must be of this kind of run: resuming a base run's checkpoint
        with ``run.init_from`` set (or a stage-2 checkpoint of another base) would train one run
        and record it as another, with false D1/D2."""
        theirs = (meta.get("stage", "base"), meta.get("D1") if meta.get("stage", "base") != "base" else None)
        stage = "base" if init is None else init.stage
        mine = (stage, init.D1 if stage != "base" else None)
        if theirs != mine:
            def describe(stage: str, d1: Optional[int]) -> str:
                return "a base run" if stage == "base" else f"a {stage} run from a base of D1 = {d1:,} tokens"
            raise ckpt.CheckpointError(
                f"run error: --resume {path}: that checkpoint continues {describe(*theirs)}, "
                f"but this config is {describe(*mine)} (run.init_from = {self.cfg.run.init_from!r}); accepted "
                "--resume with this run's own checkpoints, or the run.init_from it was started with")

    # ------------------------------------------------------------------ restore
    def _optimizer_step(self, path: Path, trainer: Optional[dict[str, Any]]) -> int:
        if trainer is None:
            trainer = ckpt.load_checkpoint(path, names=("trainer",), checksums=False)[0].get("trainer", {})
        return int(trainer.get("optimizer_step", 0))

    def _load_layout_free_optimizer(self, engine, path: Path, trainer: Optional[dict[str, Any]] = None) -> bool:
        """Load ``path``'s layout-free fp32 weights and optimizer state, at any layout: this
        rank's share of its sharded state (or, from a checkpoint written before that format, the
        consolidated optimizer.safetensors); False when it has neither."""
        if sharded.is_sharded(path):
            fragments.load(engine, self.cfg.model, self.pstate, sharded.ShardedReader(path),
                           self._optimizer_step(path, trainer))
            return True
        if not (path / weights.OPTIMIZER).is_file():
            return False
        load_full(engine, engine.module, self.cfg.model, self.pstate,
                  weights.LazyTensors(path / weights.OPTIMIZER), self._optimizer_step(path, trainer),
                  weights.open_weights(path, self.cfg.model.tie_embeddings))
        return True

    def keep_optimizer(self, engine, init: InitSource) -> None:
        """A stage-2 start with the base's optimizer state (``run.keep_optimizer``)."""
        here, there = layout(self.cfg, self.pstate.dp_size), init.meta.get("layout")
        if sharded.is_sharded(init.path) or there != here or not (init.path / "deepspeed").is_dir():
            if self._load_layout_free_optimizer(engine, init.path):
                return
            raise ckpt.CheckpointError(
                f"run error: run.keep_optimizer needs the base's optimizer state; {init.path} has none "
                f"for this layout {here} (saved at {there}); accepted keep_optimizer=false")
        load_engine_state(engine, init.path)  # a checkpoint of the older format, at this layout

    def restore(self, engine, path: Path, trainer: dict[str, Any], meta: dict[str, Any],
                guard: DivergenceGuard) -> TrainState:
        """Engine (or layout-free optimizer) state, RNG and guard state of checkpoint ``path``;
        its counters returned."""
        here = layout(self.cfg, self.pstate.dp_size)
        there = meta.get("layout")
        if not sharded.is_sharded(path) and there == here and (path / "deepspeed").is_dir():
            load_engine_state(engine, path)  # the older format's engine state, at its own layout
        elif self._load_layout_free_optimizer(engine, path, trainer):
            if there != here:
                self.emit(f"note: {path} was saved at {there}; weights and optimizer state resharded to {here}")
        else:
            self.emit(f"note: {path} was saved at {there} without optimizer state; it "
                      f"cannot be carried to {here}: the optimizer restarts fresh, the model weights are loaded")
        state = load_trainer_state(trainer)
        guard.state = GuardState(**trainer.get("guard", {}))
        self.emit(f"resumed from {path} at step {state.step} ({state.tokens} tokens)")
        return state

    def rollback(self, engine, state: TrainState, guard: DivergenceGuard, from_step: int) -> tuple[Path, TrainState]:
        """Reload the last checkpoint's weights, optimizer state and counters, keep the data
        cursor (the batches since are not replayed) and lower the learning rate (guard.lr_factor)."""
        self.wait()
        last = self.on_rank0(self._latest)
        problem = "no checkpoint has been written yet" if last is None else None
        if last is not None:
            objs, meta = ckpt.load_checkpoint(last, names=("trainer",), checksums=False)
            if not sharded.is_sharded(last) and (meta.get("layout") != layout(self.cfg, self.pstate.dp_size)
                                                 or not (last / "deepspeed").is_dir()):
                problem = f"{last} was saved at another layout ({meta.get('layout')})"
        if problem:
            raise DivergenceError(f"{guard.stop_message(from_step)} (no rollback possible: {problem})")
        cursor, wall = state.samples, state.wall_s
        if sharded.is_sharded(last):
            reader = sharded.ShardedReader(last)
            fragments.load_model_weights(engine, self.cfg.model, self.pstate, reader)
            fragments.load(engine, self.cfg.model, self.pstate, reader, self._optimizer_step(last, objs["trainer"]))
        else:
            load_engine_state(engine, last)
        state = load_trainer_state(objs["trainer"])
        state.samples, state.wall_s = max(cursor, state.samples), wall
        guard.rolled_back()
        return last, state

    # ------------------------------------------------------------------ save
    def full_state_dict(self, engine) -> Optional[dict[str, torch.Tensor]]:
        """The single-device fp32 weights on rank 0 (None elsewhere), gathered one tensor at a
        time; collective over all ranks. For tests and tools: saving streams to disk instead."""
        full = {k: v for k, v in stream_full(engine, engine.module, self.cfg.model, self.pstate)}
        if not self.is_main:
            return None
        if self.cfg.model.tie_embeddings:
            full["output.weight"] = full["tok_embeddings.weight"]
        return full

    def save(self, engine, state: TrainState, guard: DivergenceGuard, clock: StepClock,
             meta: Callable[[], dict[str, Any]], pinned: frozenset[int]) -> Path:
        """Every rank writes its own share of the fp32 weights and Adam moments (the chunks of
        the single-device tensors it holds, engine/fragments.py) to its own file, in parallel,
        hashing and fsyncing it; rank 0 then writes the index (engine/sharded.py), trainer.pt and
        meta.json and commits the checkpoint atomically. With ``run.async_save`` each rank's
        share is first copied to host memory (pinned on CUDA: training waits for that copy
        only) and everything after it finishes on a background thread (engine/async_save.py);
        the path is returned at once and committed later (``wait``). ``meta``: meta.json's
        contents (called on rank 0); ``pinned``: steps retention keeps."""
        self.wait()
        with ckpt.space_checked(self.root, state.step):
            return self._save(engine, state, guard, clock, meta, pinned)

    def _save(self, engine, state: TrainState, guard: DivergenceGuard, clock: StepClock,
              meta: Callable[[], dict[str, Any]], pinned: frozenset[int]) -> Path:
        step, ps = state.step, self.pstate
        if self.is_main:
            ckpt.begin_checkpoint(self.root, step)
        self.barrier()
        tmp = ckpt.temp_dir(self.root, step)
        adam_step = optimizer_step(engine)
        chunks = fragments.collect(engine, self.cfg.model, ps, adam_step > 0, to_host=self.async_save)
        shapes = fragments.state_shapes(engine, self.cfg.model, adam_step > 0)
        mine = f"{sharded.STATE}/{sharded.rank_file(ps.rank)}"
        commit = self._committer(tmp, step, shapes, adam_step, state, guard, clock, meta, pinned)
        if self.async_save:
            self.pending = PendingSave(step, lambda: self._finish_in_background(tmp, mine, chunks, commit), self.root)
            return ckpt.checkpoint_dir(self.root, step)
        entries = {mine: sharded.write_chunks(tmp / mine, chunks)}
        chunks.clear()
        gathered = [entries]
        if ps.world_size > 1:
            gathered = [None] * ps.world_size if self.is_main else None
            dist.gather_object(entries, gathered, dst=0)
        path = commit([e for part in gathered for e in part.items()]) if self.is_main else \
            ckpt.checkpoint_dir(self.root, step)
        self.barrier()
        return path

    def _committer(self, tmp: Path, step: int, shapes: dict[str, tuple[int, ...]], adam_step: int, state: TrainState,
                   guard: DivergenceGuard, clock: StepClock, meta: Callable[[], dict[str, Any]],
                   pinned: frozenset[int]) -> Callable[[list], Path]:
        """Rank 0's last act of a save, with the state of this step captured now: given every
        rank's file entry (bytes, sha256, its chunks), write the index, trainer.pt and commit."""
        trainer = {**asdict(state), "guard": asdict(guard.state), "rng_cpu": torch.get_rng_state(),
                   "optimizer_step": adam_step, "clock": clock.to_list()}
        if torch.cuda.is_available():
            trainer["rng_cuda"] = torch.cuda.get_rng_state()
        meta_json = meta() if self.is_main else None

        def commit(rank_entries: list) -> Path:
            files = {name: {"bytes": e["bytes"], "sha256": e["sha256"]} for name, e in rank_entries}
            sharded.write_index(tmp / sharded.STATE, shapes, [c for _, e in rank_entries for c in e["chunks"]])
            ckpt.write_object(tmp, "trainer.pt", trainer)
            return ckpt.commit_checkpoint(self.root, tmp, step, meta_json, keep_last=self.cfg.run.keep_last,
                                          pinned=pinned, known=files,
                                          extra_files=tokenizer_files(self.tokenizer_file))
        return commit

    def _finish_in_background(self, tmp: Path, mine: str, chunks: list, commit: Callable[[list], Path]) -> Optional[Path]:
        """A background save's own part on this rank: write and hash its staged share, hand the
        entry to rank 0; rank 0 then commits (its thread waits for every rank's)."""
        ps = self.pstate
        try:
            entry = sharded.write_chunks(tmp / mine, chunks)
        except BaseException as exc:
            publish_hashes(tmp, ps.rank, {"error": f"{type(exc).__name__}: {exc}"[:300]})
            raise
        finally:
            chunks.clear()  # the host copies go as soon as they are written
        publish_hashes(tmp, ps.rank, {mine: entry})
        if not self.is_main:
            return None
        path = commit(list(collect_hashes(tmp, ps.world_size, self.cfg.parallel.timeout_s).items()))
        self.emit(f"saved {path} (finished in the background)")
        return path

    def wait(self, collective: bool = True) -> None:
        """Wait for the checkpoint finishing in the background, if any, and raise its error. The
        ranks agree on the outcome (``collective``; not on a way out where one rank alone is)."""
        pending, self.pending = self.pending, None
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
