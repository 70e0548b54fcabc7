"""`megareuse train` with probes, for tests/test_sharded_build.py (launched by torchrun).

    python tests/rank_probe.py <train args>

Every rank appends one JSON line per probe to ``$PROBE_DIR/rank<N>.jsonl``:
- "build": resident memory around ``build_model`` (current RSS before, the peak RSS of the build
  itself after, MiB: the kernel's peak count is reset at the start) and
  the parameter bytes the rank holds after it;
- "save": the same around each checkpoint save;
- "weights" (rank 0, with PROBE_WEIGHTS=1): whether the weights just built, gathered here with
  the test's own code (DeepSpeed's GatheredParameters + an all-gather over TP), equal those of
  ``torch.manual_seed(run.seed); GPT(cfg)`` on one device, exactly.

Nothing here is imported by the package: the probes are patched in from outside.
"""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_now_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Restart the kernel's peak-RSS count (VmHWM, ru_maxrss) from the current RSS, so the peak
    read after a phase is that phase's own, not an earlier one's (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def emit(kind: str, **fields) -> None:
    rank = int(os.environ.get("RANK", 0))
    with open(Path(os.environ["PROBE_DIR"]) / f"rank{rank}.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": kind, "rank": rank, **fields}) + "\n")


def local_param_bytes(model) -> int:
    """Bytes of parameter storage this rank holds (a ZeRO-3 parameter counts its partition)."""
    total = 0
    for p in model.parameters():  # each shared (tied) parameter once
        held = getattr(p, "ds_tensor", None)
        tensor = held if held is not None else p.data
        total += tensor.numel() * tensor.element_size()
    return total


def check_weights(model, cfg, pstate, seed: int) -> None:
    import deepspeed
    import torch

    from megareuse.model import GPT
    from megareuse.parallel.tensor_parallel import gather_full_state_dict

    params = list(model.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params) if zero3 else torch.no_grad():
        full = gather_full_state_dict(model, pstate)
    if pstate.rank == 0:
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        reference = GPT(cfg).state_dict()
        torch.set_rng_state(state)
        unequal = [k for k in reference if not torch.equal(full[k], reference[k])]
        emit("weights", keys=len(reference), unequal=unequal)


def warm_up() -> None:
    """Pay the one-time costs of a first build (torch's meta-device kernels and decompositions
    are imported then: ~150 MiB of RSS) on a tiny model, so that the probe measures the model."""
    import torch

    from megareuse.config import ModelConfig
    from megareuse.engine.build import build_model
    from megareuse.parallel.state import single_process_state

    tiny = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=8)
    build_model(tiny, single_process_state(), torch.device("cpu"), seed=0)


def install() -> None:
    import megareuse.engine.trainer as trainer

    build = trainer.build_model

    def probed_build(cfg, pstate, *args, **kwargs):
        warm_up()
        reset_peak()
        before = rss_now_mib()
        model = build(cfg, pstate, *args, **kwargs)
        emit("build", rss_before=before, peak_after=rss_peak_mib(), param_bytes=local_param_bytes(model))
        if os.environ.get("PROBE_WEIGHTS") == "1":
            check_weights(model, cfg, pstate, kwargs["seed"])
        return model
    trainer.build_model = probed_build

    save = trainer.Trainer.save

    def probed_save(self):
        reset_peak()  # the training steps and evaluation before it peak higher than a streamed save
        before = rss_now_mib()
        path = save(self)
        emit("save", rss_before=before, peak_after=rss_peak_mib(), step=self.state.step)
        return path
    trainer.Trainer.save = probed_save


if __name__ == "__main__":
    install()
    from megareuse.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
