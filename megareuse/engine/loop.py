"""The training loop and its reliability policy (docs/reliability.md), driving a ``Stage``.

Per step: train; at log, eval and save steps: read the steps' results (one host sync), log
them (with spike detection), skip/rollback/stop for non-finite steps, evaluate, save, then one
host all-reduce on which every rank learns whether any of them got a stop signal; if so, all of
them checkpoint that step and stop with ``Preempted`` (a signal waits at most
``run.log_interval`` steps; SLURM sends it minutes before the time limit). With more than one rank a
watchdog thread publishes heartbeats; a collective that fails is explained by naming the dead or
stuck rank (``RankFailure``).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Protocol, Union

import torch
import torch.distributed as dist

from megareuse.config import Config
from megareuse.engine import checkpoint as ckpt
from megareuse.engine.checkpointer import Checkpointer
from megareuse.engine.ds_internals import precision
from megareuse.atomic import write_text_atomic
from megareuse.engine.guard import DivergenceError, DivergenceGuard, Preempted, StopSignals
from megareuse.engine.metrics import MetricsLog, Progress, format_duration, peak_memory_mib
from megareuse.engine.watchdog import RankFailure, Watchdog
from megareuse.model import flops_per_token, non_embedding_param_count, param_count
from megareuse.parallel.state import ParallelState
from megareuse.records import write_record


# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device, configured_tflops: float) -> float:
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)
    return 0.0


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


class StepResult(NamedTuple):
    """What one optimizer step returns. ``loss``, ``grad_norm`` and ``applied`` may be device
    tensors not read yet (``read_steps`` reads many at once: one host sync for all of them)."""

    loss: Union[torch.Tensor, float]
    lr: float
    grad_norm: Union[torch.Tensor, float]
    applied: Union[torch.Tensor, bool]


def read_steps(results: list[StepResult]) -> list[tuple[float, float, float, bool]]:
    """(loss, lr, grad norm, applied) as Python values for each step, with one device-to-host copy."""
    tensors = [x.detach().reshape(()).double() for r in results for x in (r.loss, r.grad_norm, r.applied)
               if isinstance(x, torch.Tensor)]
    values = iter(torch.stack(tensors).tolist() if tensors else [])
    take = lambda x: next(values) if isinstance(x, torch.Tensor) else x  # noqa: E731
    return [(float(take(r.loss)), r.lr, float(take(r.grad_norm)), bool(take(r.applied))) for r in results]


class Stage(Protocol):
    """What the loop drives: one training stage (engine/trainer.py's ``Trainer``)."""

    cfg: Config
    pstate: ParallelState
    state: Any  # TrainState: step, samples, tokens, wall_s
    guard: DivergenceGuard
    engine: Any  # the DeepSpeed engine
    emit: Callable[[str], None]
    is_main: bool
    out_dir: Path
    ckpt_root: Path
    total_steps: int
    tokens_per_step: int
    save_steps: frozenset[int]
    device: torch.device
    checkpointer: Checkpointer  # waits for saves, syncs the ranks; ``pending``: a save in the background

    def train_step(self) -> StepResult: ...
    def evaluate(self) -> dict[str, float]: ...
    def save(self) -> Path: ...
    def rollback(self, from_step: int) -> Path: ...
    def record(self, checkpoint: Path) -> dict[str, Any]: ...


class TrainingLoop:
    """Runs a ``Stage`` to its end (or to a given step) under the reliability policy."""

    def __init__(self, stage: Stage):
        self.stage = stage

    def _already_finished(self) -> Optional[dict[str, Any]]:
        """The run's summary when it finished at the step it was resumed from, else None."""
        path = self.stage.out_dir / "summary.json"
        if self.stage.state.step < self.stage.total_steps or not path.is_file():
            return None
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            return None  # a torn summary: written again at the end
        finished = isinstance(summary, dict) and summary.get("finished") and summary.get("steps") == self.stage.state.step
        return summary if finished else None

    def _open_log(self) -> Optional[MetricsLog]:
        if not self.stage.is_main:
            return None
        self.stage.out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.stage.out_dir / "config.json", json.dumps(self.stage.cfg.to_dict(), indent=2))
        log = MetricsLog(self.stage.out_dir)
        log.truncate_after(self.stage.state.step)
        for note in ckpt.clean_stale(self.stage.ckpt_root):
            self.stage.emit(f"note: {note}")
        return log

    def _start_watchdog(self) -> Optional[Watchdog]:
        if self.stage.pstate.world_size == 1:
            return None
        return Watchdog(self.stage.pstate.rank, self.stage.pstate.world_size, self.stage.cfg.parallel.timeout_s,
                        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])).start()

    def run(self, until_step: Optional[int] = None) -> dict[str, Any]:
        """Train to the end (or stop after ``until_step``, saving a checkpoint there).

        Raises Preempted after a stop signal (a checkpoint was written), DivergenceError when
        the divergence guard gives up, RankFailure when another rank died or hung."""
        cfg, run, ps = self.stage.cfg, self.stage.cfg.run, self.stage.pstate
        stop = self.stage.total_steps if until_step is None else min(until_step, self.stage.total_steps)
        done = self._already_finished()
        if done is not None:  # resumed a finished run: report it, touch nothing
            self.stage.emit(f"run already finished: {self.stage.out_dir} reached step {done['steps']} "
                            f"({done['tokens']:,} tokens); summary.json, record.json and metrics.jsonl "
                            "are left as they are")
            return done
        self.stage.checkpointer.barrier()  # every rank has loaded its checkpoint before rank 0 tidies the directory
        log = self._open_log()
        fpt = flops_per_token(cfg.model, cfg.data.seq_len)
        progress = Progress(self.stage.total_steps, self.stage.tokens_per_step, fpt,
                            ps.world_size * peak_flops(self.stage.device, run.peak_tflops), self.stage.emit, self.stage.device)
        self.stage.emit(f"training {param_count(cfg.model):,} parameters "
                  f"({non_embedding_param_count(cfg.model):,} non-embedding) for {self.stage.total_steps} "
                  f"steps x {self.stage.tokens_per_step} tokens on {ps.world_size} x {self.stage.device} "
                  f"(TP={ps.tp_size}, DP={ps.dp_size}, ZeRO-{cfg.parallel.zero_stage}, {run.dtype}: "
                  f"{precision(self.stage.engine)})")
        signals = StopSignals(cfg.guard.signals)
        watchdog = self._start_watchdog()
        t_start = time.perf_counter()
        try:
            last_eval = self._loop(stop, log, progress, signals, watchdog)
            self.stage.checkpointer.wait()  # the summary names the last checkpoint: it must be committed
            if not last_eval and self.stage.state.step >= self.stage.total_steps:
                # resumed from the final checkpoint of a run killed before its summary was written
                last_eval = self._evaluate(self.stage.state.step, log)
        except RuntimeError as exc:
            if watchdog is None or isinstance(exc, (DivergenceError, RankFailure, ckpt.CheckpointError)):
                raise
            watchdog.reporting()
            report = watchdog.diagnose()  # while this rank's own heartbeat goes on
            watchdog.stop(reported=True)
            if report is None:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RankFailure(f"rank failure seen by rank {ps.rank} at step {self.stage.state.step}: {report} "
                              f"(error: {first[:200]})") from exc
        finally:
            signals.close()
            if watchdog is not None:
                watchdog.stop()
            if log:
                log.close()
        return self._finish(log, last_eval, time.perf_counter() - t_start)

    def _loop(self, stop: int, log: Optional[MetricsLog], progress: Progress, signals: StopSignals,
              watchdog: Optional[Watchdog]) -> dict[str, float]:
        """Steps run back to back without waiting for the device; their losses, norms and skip
        flags are read (one host sync) and judged by the guard at the next log, eval or save
        step, and before acting on a stop signal. A step that is not finite was never applied
        (the optimizer declines it on the device); only the skip counting and a rollback wait."""
        run, stage = self.stage.cfg.run, self.stage
        t_start, last_eval = time.perf_counter(), {}
        wall_before = stage.state.wall_s
        progress.start(stage.state.step)
        stage.engine.train()
        beat = watchdog.progress if watchdog is not None else (lambda step, phase: None)
        pending: list[tuple[int, int, int, Any]] = []  # (step, tokens, samples, StepResult) not read yet
        while stage.state.step < stop:
            beat(stage.state.step, "train")
            result = stage.train_step()
            pending.append((stage.state.step, stage.state.tokens, stage.state.samples, result))
            stage.state.wall_s = wall_before + time.perf_counter() - t_start
            step = stage.state.step
            last = step == stage.total_steps
            evaluating = step % run.eval_interval == 0 or last
            saving = step % run.save_interval == 0 or last or step == stop or step in stage.save_steps
            saved = None
            settling = evaluating or saving or step % run.log_interval == 0
            if settling:
                if self._settle(pending, stop, log, progress):  # rolled back
                    t_start, wall_before = time.perf_counter(), stage.state.wall_s
                    progress.start(stage.state.step)
                    continue
                if evaluating:
                    beat(step, "eval")
                    last_eval = self._evaluate(step, log)
                if saving:
                    beat(step, "save")
                    saved = stage.save()
                    if stage.checkpointer.pending is None:
                        stage.emit(f"saved {saved}")
            # the ranks agree on stop signals where they wait for the device anyway (log, eval and
            # save steps): an all-reduce every step would be a host round trip between steps
            received = signals.agreed() if settling else None
            if received is not None:
                if self._settle(pending, stop, log, progress):
                    continue  # the signal stays set: acted on after the rollback's next step
                beat(step, "save")
                self._preempt(received, saved or stage.save(), log)
        return last_eval

    def _settle(self, pending: list[tuple[int, int, int, Any]], stop: int, log: Optional[MetricsLog],
                progress: Progress) -> bool:
        """Read the pending steps, log them and apply the guard; True when it rolled back."""
        run, stage = self.stage.cfg.run, self.stage
        steps = list(zip(pending, read_steps([r for *_, r in pending])))
        pending.clear()
        for (step, tokens, samples, _), (loss, lr, grad_norm, applied) in steps:
            finite = applied and math.isfinite(loss)
            record = {"kind": "train", "step": step, "tokens": tokens,
                      "loss": loss if math.isfinite(loss) else None, "lr": lr,
                      "grad_norm": grad_norm if math.isfinite(grad_norm) else None}
            if not finite:
                record["skipped"] = True
            elif (median := stage.guard.spikes.observe(loss)) is not None:
                stage.guard.state.spikes += 1
                record["spike_median"] = median
                stage.emit(f"loss spike at step {step}: {loss:.4f} > {stage.cfg.guard.spike_ratio:g} x "
                           f"running median {median:.4f}")
            if step % run.log_interval == 0 or step == stage.total_steps or step == stop:
                skipped = stage.guard.state.skipped_steps + (not finite)
                record.update(progress.line(step, loss, lr, f"skipped {skipped}" if skipped else ""))
            if log:
                log.write(record)
            if not finite and self._on_bad_step(step, loss, grad_norm, log, samples):
                return True  # the steps after it trained on the diverging model: the rollback drops them
        return False

    def _evaluate(self, step: int, log: Optional[MetricsLog]) -> dict[str, float]:
        """Validation loss per domain, logged as an eval record and shown."""
        losses = self.stage.evaluate()
        if log:
            log.write({"kind": "eval", "step": step, "tokens": self.stage.state.tokens,
                       **{f"valid_loss/{d}": v for d, v in losses.items()}})
        self.stage.emit(f"eval step {step}: " + ", ".join(f"{d} {v:.4f}" for d, v in losses.items()))
        return losses

    def _on_bad_step(self, step: int, loss: float, grad_norm: float, log: Optional[MetricsLog],
                     samples: int) -> bool:
        """A skipped step: count it; roll back (returns True) or stop when the guard says so.
        ``samples``: the data cursor right after that step, where training goes on after a
        rollback (steps trained after it, before it was read, are dropped and not skipped over)."""
        self.stage.emit(f"warning: step {step} skipped (loss {loss}, gradient norm {grad_norm}); "
                  f"{self.stage.guard.state.skipped_steps + 1} skipped so far")
        action = self.stage.guard.on_skip(step)
        if action is None:
            return False
        if action == "stop":
            raise DivergenceError(self.stage.guard.stop_message(step))
        self.stage.state.samples = samples
        path = self.stage.rollback(step)
        self.stage.emit(f"rolled back to {path} (step {self.stage.state.step}) after {self.stage.cfg.guard.max_skips} skipped "
                  f"steps; learning rate x {self.stage.guard.state.lr_scale:g} from now on")
        if log:
            log.truncate_after(self.stage.state.step)
            log.write({"kind": "rollback", "step": step, "to_step": self.stage.state.step, "checkpoint": str(path),
                       "lr_scale": self.stage.guard.state.lr_scale, "samples": self.stage.state.samples})
        return True

    def _preempt(self, received: str, path: Path, log: Optional[MetricsLog]) -> None:
        step = self.stage.state.step
        if log:
            log.write({"kind": "preempted", "step": step, "signal": received, "checkpoint": str(path)})
            _write_json(self.stage.out_dir / "preempted.json",
                        {"signal": received, "step": step, "checkpoint": str(path),
                         "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.stage.emit(f"{received}: checkpointed step {step} to {path}; stopping (resume with --resume auto)")
        raise Preempted(received, step, str(path))

    def _peak_memory(self) -> dict[str, list[float]]:
        """Every rank's peak memory (MiB), in rank order: {"rss": [...], "device": [...]}."""
        mine = peak_memory_mib(self.stage.device)
        everyone = [mine]
        if self.stage.pstate.world_size > 1:
            everyone = [None] * self.stage.pstate.world_size
            dist.all_gather_object(everyone, mine)
        return {kind: [m[kind] for m in everyone] for kind in ("rss", "device")}

    def _finish(self, log: Optional[MetricsLog], last_eval: dict[str, float], wall: float) -> dict[str, Any]:
        summary = {"peak_memory_mib": self._peak_memory(),"steps": self.stage.state.step, "total_steps": self.stage.total_steps,
                   "tokens": self.stage.state.tokens, "valid_loss": last_eval, "wall_s": wall,
                   "finished": self.stage.state.step >= self.stage.total_steps,
                   "skipped_steps": self.stage.guard.state.skipped_steps, "rollbacks": self.stage.guard.state.rollbacks,
                   "loss_spikes": self.stage.guard.state.spikes,
                   "checkpoint": str(ckpt.checkpoint_dir(self.stage.ckpt_root, self.stage.state.step))}
        if log and summary["finished"]:
            (self.stage.out_dir / "preempted.json").unlink(missing_ok=True)
            _write_json(self.stage.out_dir / "summary.json", summary)
            if self.stage.cfg.run.write_record:
                write_record(self.stage.out_dir, self.stage.record(Path(summary["checkpoint"])))
            self.stage.emit(f"done: {self.stage.state.tokens:,} tokens in {format_duration(wall)}")
        return summary
