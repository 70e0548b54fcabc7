"""Validation loss on held-out data, one number per domain."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from megareuse.model import cross_entropy


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, max_tokens: int, batch_size: int,
             device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager]
             = contextlib.nullcontext) -> float:
    """Mean token cross-entropy over the first ``max_tokens // seq_len`` samples of ``dataset``
    (a fixed, seeded subset, the same at every evaluation). Restores the model's train mode."""
    n_samples = max(1, min(max_tokens // dataset.seq_len, dataset.num_samples))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, n_samples, batch_size):
            size = min(batch_size, n_samples - start)
            batch = dataset.batch(start, size).to(device)
            with autocast():
                loss = cross_entropy(model(batch[:, :-1]), batch[:, 1:])
            total += float(loss) * size
            count += size
    finally:
        model.train(was_training)
    return total / count


def evaluate_checkpoint(path, data_dir: str | None = None, domains: list[str] | None = None,
                        max_tokens: int | None = None, batch_size: int | None = None,
                        device: str = "cpu") -> dict[str, float]:
    """Validation loss per domain of a saved checkpoint (its own config unless overridden)."""
    from megareuse.config import Config
    from megareuse.engine.checkpoint import load_checkpoint
    from megareuse.engine.inputs import open_training_data
    from megareuse.model import GPT

    objs, meta = load_checkpoint(path, names=("model",), map_location=device)
    cfg = Config.from_dict(meta["config"])
    if data_dir is not None:
        cfg.data.dir = data_dir
    if domains:
        cfg.data.valid = list(domains)
    cfg.validate()
    data = open_training_data(cfg.data, cfg.model)
    model = GPT(cfg.model).to(device)
    model.load_state_dict(objs["model"])
    return {domain: evaluate(model, ds, max_tokens or cfg.run.eval_tokens,
                             batch_size or cfg.run.micro_batch_size, torch.device(device))
            for domain, ds in data.valid.items()}
