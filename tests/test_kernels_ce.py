"""Triton cross-entropy and the chunked linear + cross-entropy vs float64 references.

Covers ignored targets, ragged last chunks and vocabulary blocks, no-grad evaluation, and the
vocab-parallel layout on two gloo ranks (each holding half of the output matrix).
Tolerance: max |got - ref| / max |ref| per tensor below TOL[dtype] (loss: relative error).
"""
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from megareuse_kernels import cross_entropy as ce  # noqa: E402
from megareuse_kernels.common import poisoned_outputs  # noqa: E402

DEVICE = "cuda" if os.environ.get("MEGAREUSE_TEST_GPU") == "1" else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
N, D, V = 37, 48, 300  # 300 = 2 x 128 + 44: a ragged vocabulary block in the interpreter


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_outputs():
        yield


def rel_err(got, want):
    got = torch.as_tensor(got)
    assert torch.isfinite(got).all(), "non-finite values (unwritten NaN-poisoned elements?)"
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def data(dtype, seed=0, n=N, ignore=(3, 20)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3
    t = torch.randint(0, V, (n,), generator=g)
    t[list(ignore)] = -100
    return h.to(DEVICE, dtype), w.to(DEVICE, dtype), t.to(DEVICE)


def ref_loss(h, w, t, reduction="mean"):
    """Mean (or sum) over non-ignored rows of logsumexp(logits) - logits[target], float64."""
    logits = h.double() @ w.double().T
    keep = t != -100
    rows = torch.logsumexp(logits[keep], -1) - logits[keep].gather(1, t[keep][:, None]).squeeze(1)
    return rows.mean() if reduction == "mean" else rows.sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [16, 1000], ids=["3-chunks", "1-chunk"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_float64(dtype, chunk, reduction):
    h, w, t = data(dtype)
    h.requires_grad_(), w.requires_grad_()
    loss = ce.linear_cross_entropy(h, w, t, chunk_size=chunk, reduction=reduction)
    (loss * 0.5).backward()  # a non-unit incoming gradient
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = ref_loss(h64, w64, t, reduction)
    (ref * 0.5).backward()
    errs = {"loss": rel_err(loss, ref), "dh": rel_err(h.grad, h64.grad), "dw": rel_err(w.grad, w64.grad)}
    assert max(errs.values()) < TOL[dtype], errs
    assert h.grad[3].abs().max() == 0 and h.grad[20].abs().max() == 0  # ignored rows: no gradient


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_on_logits_matches_float64(dtype):
    h, w, t = data(dtype, seed=1)
    logits = (h.double() @ w.double().T * 2.0).to(dtype).view(1, N, V).requires_grad_()
    loss = ce.cross_entropy(logits, t.view(1, N))
    loss.backward()
    l64 = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(l64.view(N, V), t, ignore_index=-100)
    ref.backward()
    errs = {"loss": rel_err(loss, ref), "dlogits": rel_err(logits.grad, l64.grad)}
    assert max(errs.values()) < TOL[dtype], errs


def test_no_grad_evaluation_and_weight_only_grad():
    h, w, t = data(torch.float32, seed=2)
    with torch.no_grad():
        loss = ce.linear_cross_entropy(h.requires_grad_(), w, t, chunk_size=8)
    assert rel_err(loss, ref_loss(h.detach(), w, t)) < 1e-5 and loss.grad_fn is None
    h.requires_grad_(False)
    w.requires_grad_()
    ce.linear_cross_entropy(h, w, t, chunk_size=8).backward()
    w64 = w.detach().double().requires_grad_()
    ref_loss(h, w64, t).backward()
    assert h.grad is None and rel_err(w.grad, w64.grad) < 1e-5


def test_bad_arguments_raise():
    h, w, t = data(torch.float32)
    with pytest.raises(ValueError, match="must be \\[..., d\\] and \\[V, d\\] of one dtype"):
        ce.linear_cross_entropy(h, w.half(), t)
    with pytest.raises(ValueError, match="reduction 'none' is not supported; accepted: mean, sum"):
        ce.linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="targets must be int64/int32 with 37 elements"):
        ce.linear_cross_entropy(h, w, t[:5])


# ----------------------------------------------------------------------------- vocab parallel
def _vocab_parallel_rank(rank, world, init_file, result_file):
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        h, w, t = data(torch.float32, seed=4)
        shard = V // world
        h.requires_grad_()
        w_local = w[rank * shard:(rank + 1) * shard].clone().requires_grad_()
        with poisoned_outputs():
            loss = ce.linear_cross_entropy(h, w_local, t, chunk_size=16, process_group=dist.group.WORLD)
        loss.backward()
        torch.save({"loss": loss.detach(), "dh": h.grad, "dw": w_local.grad}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU gloo test")
def test_vocab_parallel_two_ranks_match_full_vocabulary(tmp_path):
    """Each rank holds 150 of the 300 output rows; losses and gradients equal the full-vocab ones."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_vocab_parallel_rank, args=(world, tmp_path / "init", tmp_path / "out"), nprocs=world, join=True)
    h, w, t = data(torch.float32, seed=4)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = ref_loss(h64, w64, t)
    ref.backward()
    shard = V // world
    for rank in range(world):
        got = torch.load(tmp_path / f"out.{rank}")
        assert rel_err(got["loss"], ref) < 1e-5
        assert rel_err(got["dh"], h64.grad) < 1e-5  # full gradient of the replicated hidden
        assert rel_err(got["dw"], w64.grad[rank * shard:(rank + 1) * shard]) < 1e-5
