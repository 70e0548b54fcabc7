"""Validation loss on held-out data, one number per domain."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from megareuse.model import cross_entropy

LossFn = Callable[[torch.Tensor], torch.Tensor]  # batch [B, T+1] -> mean token loss


@torch.no_grad()
def evaluate(batch_loss: LossFn, dataset, max_tokens: int, batch_size: int, device: torch.device,
             dp_rank: int = 0, dp_size: int = 1, dp_group: Optional[object] = None) -> float:
    """Mean token cross-entropy over the first ``max_tokens // seq_len`` samples of ``dataset``
    (a fixed, seeded subset, the same at every evaluation and for every world size).

    Data-parallel ranks take interleaved slices of each global batch; every rank runs the same
    number of forward passes (a rank with nothing left runs one with weight 0), because ZeRO-3
    and tensor parallelism need all ranks in every forward.
    """
    n_samples = max(1, min(max_tokens // dataset.seq_len, dataset.num_samples))
    # loss sum and sample count stay on the device: no host sync per batch, and the all-reduce
    # runs on the device's backend (NCCL on CUDA)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, n_samples, batch_size * dp_size):
        first = start + dp_rank * batch_size
        size = max(0, min(batch_size, n_samples - first))
        batch = dataset.batch(first if size else 0, max(size, 1)).to(device)
        totals[0] += batch_loss(batch).detach().double() * size
        totals[1] += size
    if dp_size > 1:
        dist.all_reduce(totals, group=dp_group)
    return float(totals[0] / totals[1])


def model_batch_loss(model: torch.nn.Module) -> LossFn:
    """The single-device loss of a plain GPT on a batch of samples."""
    return lambda batch: cross_entropy(model(batch[:, :-1]), batch[:, 1:])


def _eval_tokenizer(path, meta: dict, configured: str | None, data_dir: str | None) -> str | None:
    """The data.tokenizer evaluation uses: none when ``--data`` is given and holds a tokenizer
    (its own is checked against the checkpoint's), else the run's data.tokenizer while it exists,
    else the checkpoint's own copy of its tokenizer."""
    from pathlib import Path

    from megareuse.data.hf_tokenizer import TOKENIZER_FILES
    if data_dir is not None and any((Path(data_dir) / n).is_file() for n in TOKENIZER_FILES):
        return None
    if data_dir is None and (configured is None or Path(configured).exists()):
        return configured
    copy = Path(path) / str((meta.get("tokenizer") or {}).get("file") or "tokenizer.model")
    return str(copy) if copy.is_file() else configured


def evaluate_checkpoint(path, data_dir: str | None = None, domains: list[str] | None = None,
                        max_tokens: int | None = None, batch_size: int | None = None,
                        device: str = "cpu") -> dict[str, float]:
    """Validation loss per domain of a saved checkpoint (its own config unless overridden).

    Reads the consolidated single-device weights (model.safetensors), whatever the TP degree and ZeRO
    stage the checkpoint was trained with."""
    from megareuse.config import Config
    from megareuse.engine.checkpoint import CheckpointError, read_meta, verify_checkpoint
    from megareuse.engine.inputs import open_validation_data
    from megareuse.engine.ds import resolve_device
    from megareuse.engine.weights import load_state_dict
    from megareuse.model import GPT

    from megareuse.config import ConfigError, RunConfig
    if device not in RunConfig.DEVICES:
        raise ConfigError(f"config error: --device = {device!r}: accepted one of {', '.join(RunConfig.DEVICES)}")
    torch_device = resolve_device(device, field="--device")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    meta = read_meta(path)
    cfg = Config.from_dict(meta["config"])
    if data_dir is not None:
        cfg.data.dir = data_dir
    cfg.data.tokenizer = _eval_tokenizer(path, meta, cfg.data.tokenizer, data_dir)
    if domains is not None:
        cfg.data.valid = list(domains)
    cfg.parallel.tp, cfg.parallel.ds_config = 1, None
    # evaluation reads this checkpoint's own weights: the base it was trained from (which may be
    # gone by now) and the stage-2 data options play no part
    cfg.run.init_from, cfg.run.keep_optimizer, cfg.data.replay = None, False, 0.0
    cfg.run.device = device
    cfg.validate()
    tok, valid = open_validation_data(cfg.data, cfg.model)  # the training splits are not read
    saved_sha = meta.get("tokenizer", {}).get("sha256")
    if saved_sha is not None and saved_sha != tok.tokenizer.sha256:
        raise CheckpointError(
            f"evaluate error: --data {cfg.data.dir} was prepared with another tokenizer (sha256 "
            f"{tok.tokenizer.sha256[:12]}..., {tok.file}) than checkpoint {path} was trained with "
            f"({saved_sha[:12]}...); "
            "accepted data prepared with the checkpoint's tokenizer (its copy is in the checkpoint)")
    model = GPT(cfg.model).to(torch_device)
    model.load_state_dict(load_state_dict(path, cfg.model.tie_embeddings, torch_device, cfg.model))
    model.eval()
    return {domain: evaluate(model_batch_loss(model), ds, max_tokens or cfg.run.eval_tokens,
                             batch_size or cfg.run.micro_batch_size, torch_device)
            for domain, ds in valid.items()}
