"""Tensor-parallel ranks pick the same loss implementation under ``model.loss = auto``.

On CUDA, ``auto`` takes the fused linear + cross-entropy kernel only after a check each rank runs
for itself (megareuse_kernels/verify.py). The fused and the chunked loss all-reduce at different
points, so TP ranks that disagreed (one GPU's check failing) would hang. The vocabulary-parallel
head decides once with a host all-reduce (MIN) over the TP group. Here 2 gloo ranks stand in for
2 GPUs: rank 1's check is made to fail; both must run the chunked loss, and give the
single-device loss.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback

import pytest
import torch
import torch.nn.functional as F


def _rank(rank: int, port: int, out: "mp.Queue") -> None:
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist

        import megareuse.parallel.head as tp_head
        from megareuse.model.head import LMHead
        from megareuse.parallel.state import init_parallel_state

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        state = init_parallel_state(2, timeout_s=60)
        torch.manual_seed(0)
        full = LMHead(8, 16, loss="auto", chunk_tokens=4)
        hidden, targets = torch.randn(2, 6, 8), torch.randint(0, 16, (2, 6))
        reference = F.cross_entropy((hidden @ full.weight.T).reshape(-1, 16), targets.reshape(-1)).item()

        tp_head.checked_on = lambda h: True  # as on CUDA: the decision came from a per-rank check
        tp_head.resolve_loss = lambda impl, h, chunk, vocab=None: "fused" if rank == 0 else "chunked"
        used = []
        real = tp_head.linear_cross_entropy
        tp_head.linear_cross_entropy = lambda impl, *a, **k: (used.append(impl), real(impl, *a, **k))[1]
        head = tp_head.VocabParallelHead.from_linear(full, state)
        losses = [head(hidden, targets).item() for _ in range(2)]
        out.put((rank, used, head._fused_everywhere, losses, reference))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test
        out.put((rank, traceback.format_exc(), None, None, None))


def test_tp_ranks_agree_on_the_fused_loss():
    from megareuse.parallel.launch import free_port

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = sorted(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, used, fused, losses, reference in results:
        assert isinstance(used, list), used  # a traceback otherwise
        assert used == ["chunked", "chunked"] and fused is False, (rank, used)
        assert losses == pytest.approx([reference, reference], rel=1e-5)
