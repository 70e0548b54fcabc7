"""A tensor-parallel-aware RNG tracker (after Megatron's ``tensor_parallel/random.py``).

Under tensor parallelism two kinds of random draws exist:

- draws that must be the *same* on every rank of a TP group (anything applied to replicated
  activations or replicated weights): these use torch's default generator, seeded with the same
  ``seed`` on every TP rank;
- draws that must *differ* across the TP group (initialising a weight shard directly, dropout
  on a sharded activation such as attention probabilities of this rank's heads): these run
  inside ``tracker.fork()``, which swaps in the "model-parallel" state, seeded
  ``seed + 2718 + tp_rank``, and swaps the default state back afterwards.

The LLaMA-like model has no dropout today, so ``fork()`` is only used when a sharded layer
initialises its own weight (``init_method`` without a full weight). ``parallelize_model``
never draws: it slices full single-device weights, which is what makes a TP model bitwise
comparable with the single-device one. If dropout is ever added inside a TP region, wrap it in
``get_rng_tracker().fork()``; dropout on the residual stream must stay outside (same mask on
every TP rank).

The tracked states are CPU states always, plus the current CUDA device's state when CUDA is
available (draws on CUDA tensors use the CUDA generator).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

MODEL_PARALLEL_RNG = "model-parallel"
MODEL_PARALLEL_SEED_OFFSET = 2718


def _cuda() -> bool:
    return torch.cuda.is_available()


def _get_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if _cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and _cuda():
        torch.cuda.set_rng_state(state["cuda"])


def _seeded_state(seed: int) -> dict[str, torch.Tensor]:
    """The generator states torch.manual_seed(seed) would give, without touching the current ones."""
    saved = _get_state()
    try:
        torch.manual_seed(seed)  # seeds CPU and every CUDA device
        return _get_state()
    finally:
        _set_state(saved)


class RNGStatesTracker:
    """Named RNG states that can be swapped in and out of torch's default generators.

    ``add(name, seed)`` registers a state; ``fork(name)`` runs a block with that state as the
    default generator and stores the advanced state back on exit, so successive forks continue
    one stream while the default stream is left exactly where it was.
    """

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._seeds: dict[str, int] = {}

    def reset(self) -> None:
        self._states.clear()
        self._seeds.clear()

    def names(self) -> tuple[str, ...]:
        return tuple(self._states)

    def add(self, name: str, seed: int) -> None:
        """Register ``name`` seeded with ``seed``; a name or a seed can be used only once."""
        if name in self._states:
            raise ValueError(f"RNG state {name!r} is already registered")
        if seed in self._seeds.values():
            raise ValueError(f"seed {seed} is already used by another RNG state")
        self._seeds[name] = seed
        self._states[name] = _seeded_state(seed)

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """A copy of every tracked state (for checkpoints)."""
        return {name: {k: v.clone() for k, v in s.items()} for name, s in self._states.items()}

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore states saved by ``get_states`` (replacing every tracked state)."""
        self._states = {name: {k: v.clone() for k, v in s.items()} for name, s in states.items()}
        self._seeds = {name: seed for name, seed in self._seeds.items() if name in self._states}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Use the tracked state ``name`` inside the block; restore the default state after."""
        if name not in self._states:
            raise ValueError(f"RNG state {name!r} is not registered (call model_parallel_seed first); "
                             f"registered: {', '.join(self._states) or 'none'}")
        outer = _get_state()
        _set_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_state()
            _set_state(outer)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (one per process, like torch's default generator)."""
    return _TRACKER


def model_parallel_seed(seed: int, state=None, tracker: Optional[RNGStatesTracker] = None) -> None:
    """Seed the default generators with ``seed`` (same on every TP rank) and (re)register the
    "model-parallel" state with ``seed + 2718 + tp_rank`` (distinct across a TP group).

    ``state`` is a ParallelState; ``None`` means tp_rank 0. Data-parallel replicas get the same
    seeds: they hold the same model, and their data differs through the sampler, not the RNG.
    """
    tracker = _TRACKER if tracker is None else tracker
    tp_rank = 0 if state is None else state.tp_rank
    torch.manual_seed(seed)
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, seed + MODEL_PARALLEL_SEED_OFFSET + tp_rank)
