"""Benchmark the fused Triton kernels against their torch baselines on one CUDA device.

    python benchmarks/kernel_speed.py [--json kernels.json] [--reps 30] [--seqs 1024 2048 4096 8192]
    python benchmarks/kernel_speed.py --smoke      # tiny shapes on CPU under TRITON_INTERPRET=1 (plumbing only)

Shapes come from the 1.1B configuration (TinyLlama-like: d_model 2048, 22 layers, 4 kv heads,
FFN 5632, vocabulary 32000) at 16384 tokens per micro-batch, in bf16: attention with head dim 64
(32 heads) and 128 (16 heads) at sequence lengths 1k-8k, causal; RMSNorm over [16384, 2048];
SwiGLU over [16384, 5632]; RoPE of q [B, H, S, D]; linear + cross-entropy [16384, 2048] x
[32000, 2048]. Each row is timed with CUDA events around single calls: warm-up, then the median
of ``--reps`` repetitions; every kernel and its baseline run in the same process, one after the
other. Baselines: SDPA with each of its backends (flash, cuDNN, memory-efficient; K/V heads
repeated before timing, the cheaper variant for SDPA) for attention; eager torch (the model's own
functions) for the rest. Achieved TFLOP/s (attention, linear+CE) or GB/s (memory-bound kernels,
counting each tensor read or written once) and the fraction of the device peak are reported;
peaks come from a table of known devices or --peak-tflops / --peak-gbps. The table is printed
and everything is written as JSON, with the issue's targets evaluated at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megareuse.model.norm import rms_norm as torch_rms_norm  # noqa: E402
from megareuse.model.rope import apply_rope as torch_rope, rope_cos_sin  # noqa: E402
from megareuse_kernels import cross_entropy as k_ce, flash_attention as k_fa  # noqa: E402
from megareuse_kernels import rmsnorm as k_rms, rope as k_rope, swiglu as k_swiglu  # noqa: E402

MODEL = dict(d_model=2048, n_kv_heads=4, ffn_hidden=5632, vocab=32000, tokens=16384)
# Dense bf16 tensor-core TFLOP/s and memory GB/s of known devices (vendor datasheets).
PEAKS = [("H200", 989.0, 4800.0), ("H100 NVL", 835.0, 3900.0), ("H100 PCIe", 756.0, 2000.0),
         ("H100", 989.0, 3350.0), ("A100-SXM4-80GB", 312.0, 2039.0), ("A100", 312.0, 1555.0),
         ("L40S", 362.0, 864.0), ("A10G", 125.0, 600.0)]


def device_peaks(name: str, tflops: float | None, gbps: float | None) -> tuple[float | None, float | None]:
    for key, t, g in PEAKS:
        if key.lower() in name.lower():
            return tflops or t, gbps or g
    return tflops, gbps


class Timer:
    """Median wall time of single calls in ms: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def fwd_bwd(fn, inputs, grad):
    """A closure running fn(*inputs) and its backward (autograd.grad: nothing accumulates)."""
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)


def peak_memory(fn, device) -> float | None:
    """Extra memory (MiB) allocated at the peak of fn() beyond what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def attention_rows(args, timer, device, dtype):
    rows = []
    backends = {}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
    else:  # smoke run: SDPA's default (math) kernel
        from contextlib import nullcontext

        sdpa_kernel, backends = (lambda backend: nullcontext()), {"sdpa-default": None}
    for D in args.head_dims:
        H, Hkv = MODEL["d_model"] // D, MODEL["n_kv_heads"]
        for S in args.seqs:
            B = max(1, args.tokens // S)
            g = torch.Generator(device).manual_seed(0)
            q = torch.randn(B, H, S, D, device=device, dtype=dtype, generator=g).requires_grad_()
            k, v = (torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=g).requires_grad_()
                    for _ in range(2))
            kr, vr = (t.detach().repeat_interleave(H // Hkv, 1).requires_grad_() for t in (k, v))
            dout = torch.randn_like(q)
            flops_fwd = 2 * B * H * S * S * D  # two matmuls of 2 B H S^2 D, halved by the causal mask
            shape = f"B{B} H{H}/{Hkv} S{S} D{D}"
            impls = {"triton": (lambda a, b, c: k_fa.flash_attention(a, b, c, causal=True), (q, k, v))}
            for name, backend in backends.items():
                def sdpa(a, b, c, backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(a, b, c, is_causal=True)
                impls[name] = (sdpa, (q, kr, vr))
            for name, (fn, inputs) in impls.items():
                for mode, flops in (("fwd", flops_fwd), ("fwd+bwd", 3.5 * flops_fwd)):
                    call = (lambda fn=fn, inputs=inputs: fn(*inputs)) if mode == "fwd" else fwd_bwd(fn, inputs, dout)
                    try:
                        with torch.set_grad_enabled(mode != "fwd"):
                            ms = timer(call)
                    except RuntimeError as err:  # an SDPA backend unavailable for this shape / device
                        rows.append(dict(kernel="attention", shape=shape, mode=mode, impl=name, error=str(err)[:120]))
                        continue
                    rows.append(dict(kernel="attention", shape=shape, mode=mode, impl=name, ms=ms,
                                     tflops=flops / ms / 1e9, head_dim=D, seq=S))
    return rows


def memory_bound_rows(args, timer, device, dtype):
    rows, n = [], args.tokens
    g = torch.Generator(device).manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_()

    x, w = rand(n, MODEL["d_model"]), rand(MODEL["d_model"])
    gate, up = rand(n, MODEL["ffn_hidden"]), rand(n, MODEL["ffn_hidden"])
    S, D = args.rope_seq, args.rope_head_dim
    qr = rand(max(1, n // S), MODEL["d_model"] // D, S, D)
    cos, sin = (t.to(device) for t in rope_cos_sin(S, D))
    e = torch.tensor([], dtype=dtype).element_size()
    cases = [
        ("rms_norm", f"[{n}, {MODEL['d_model']}]", (x, w), x.numel() * e,
         {"triton": lambda a, b: k_rms.rms_norm(a, b, 1e-5), "eager": lambda a, b: torch_rms_norm(a, b, 1e-5)},
         (2, 3)),
        ("swiglu", f"[{n}, {MODEL['ffn_hidden']}]", (gate, up), gate.numel() * e,
         {"triton": k_swiglu.swiglu, "eager": lambda a, b: F.silu(a) * b}, (3, 5)),
        ("rope", f"q {list(qr.shape)}", (qr,), qr.numel() * e,
         {"triton": lambda a: k_rope.apply_rope(a, cos, sin), "eager": lambda a: torch_rope(a, cos, sin)}, (2, 2)),
    ]
    for kernel, shape, inputs, unit_bytes, impls, (reads_writes_fwd, reads_writes_bwd) in cases:
        dout = torch.randn_like(impls["eager"](*inputs))
        for name, fn in impls.items():
            for mode, nbytes in (("fwd", reads_writes_fwd * unit_bytes),
                                 ("fwd+bwd", (reads_writes_fwd + reads_writes_bwd) * unit_bytes)):
                with torch.set_grad_enabled(mode != "fwd"):
                    call = (lambda fn=fn: fn(*inputs)) if mode == "fwd" else fwd_bwd(fn, inputs, dout)
                    ms = timer(call)
                rows.append(dict(kernel=kernel, shape=shape, mode=mode, impl=name, ms=ms, gbps=nbytes / ms / 1e6))
    return rows


def cross_entropy_rows(args, timer, device, dtype):
    n, d, V = args.tokens, MODEL["d_model"], args.vocab
    g = torch.Generator(device).manual_seed(2)
    h = (torch.randn(n, d, device=device, dtype=dtype, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(V, d, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, V, (n,), device=device, generator=g)
    impls = {"triton": lambda a, b: k_ce.linear_cross_entropy(a, b, t),
             "eager": lambda a, b: F.cross_entropy((a @ b.t()).float(), t)}
    rows = []
    for name, fn in impls.items():
        call = fwd_bwd(fn, (h, w), None)
        ms = timer(call)
        rows.append(dict(kernel="linear+cross_entropy", shape=f"[{n}, {d}] x [{V}, {d}]", mode="fwd+bwd",
                         impl=name, ms=ms, tflops=6 * n * d * V / ms / 1e9, peak_mib=peak_memory(call, device)))
    return rows


def add_ratios(rows, peak_tflops, peak_gbps):
    """speedup vs the row's baseline (sdpa-flash for attention, eager otherwise), vs the fastest
    SDPA backend (attention), % of peak, and the peak-memory ratio (linear+CE)."""
    base = {(r["kernel"], r["shape"], r["mode"]): r for r in rows
            if r["impl"] in ("sdpa-flash", "eager") and "ms" in r}
    best_sdpa = {}
    for r in rows:
        if r["impl"].startswith("sdpa") and "ms" in r:
            key = (r["shape"], r["mode"])
            best_sdpa[key] = min(best_sdpa.get(key, float("inf")), r["ms"])
    for r in rows:
        if "ms" not in r:
            continue
        b = base.get((r["kernel"], r["shape"], r["mode"]))
        r["speedup"] = b["ms"] / r["ms"] if b else None
        if r["kernel"] == "attention" and (r["shape"], r["mode"]) in best_sdpa:
            r["speedup_vs_best_sdpa"] = best_sdpa[(r["shape"], r["mode"])] / r["ms"]
        if r.get("tflops") and peak_tflops:
            r["pct_peak"] = 100 * r["tflops"] / peak_tflops
        if r.get("gbps") and peak_gbps:
            r["pct_peak"] = 100 * r["gbps"] / peak_gbps
        if r.get("peak_mib") and b and b.get("peak_mib"):
            r["memory_saving"] = b["peak_mib"] / r["peak_mib"]
    return rows


def targets(rows):
    """The issue's targets, evaluated where the rows exist (None when not measured)."""
    def row(kernel, impl, mode, shape_part=""):
        return next((r for r in rows if r["kernel"] == kernel and r["impl"] == impl and r["mode"] == mode
                     and shape_part in r["shape"] and "ms" in r), None)

    out = {}
    att = row("attention", "triton", "fwd+bwd", "S4096 D128")
    out["attention D128 S4096 causal fwd+bwd >= 0.8x sdpa-flash"] = att and att["speedup"] and att["speedup"] >= 0.8
    for kernel in ("rms_norm", "swiglu"):
        r = row(kernel, "triton", "fwd+bwd")
        out[f"{kernel} fwd+bwd >= 1.5x eager"] = r and r["speedup"] >= 1.5
        out[f"{kernel} fwd+bwd >= 70% of peak bandwidth"] = r and r.get("pct_peak") and r["pct_peak"] >= 70
    ce = row("linear+cross_entropy", "triton", "fwd+bwd")
    out["linear+CE peak memory >= 2x lower"] = ce and ce.get("memory_saving") and ce["memory_saving"] >= 2
    return {k: (None if v is None else bool(v)) for k, v in out.items()}


def print_table(rows):
    head = f"{'kernel':<21}{'shape':<28}{'mode':<9}{'impl':<15}{'ms':>9}{'TFLOP/s|GB/s':>14}{'%peak':>7}" \
           f"{'speedup':>9}{'vs best':>9}{'peak MiB':>10}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        if "ms" not in r:
            print(f"{r['kernel']:<21}{r['shape']:<28}{r['mode']:<9}{r['impl']:<15}  unavailable: {r['error']}")
            continue
        rate = r.get("tflops") or r.get("gbps") or 0.0
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{r['kernel']:<21}{r['shape']:<28}{r['mode']:<9}{r['impl']:<15}{r['ms']:>9.3f}{rate:>14.1f}"
              f"{fmt(r.get('pct_peak'), '>7.1f'):>7}{fmt(r.get('speedup'), '>9.2f'):>9}"
              f"{fmt(r.get('speedup_vs_best_sdpa'), '>9.2f'):>9}{fmt(r.get('peak_mib'), '>10.0f'):>10}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default="kernels_benchmark.json", help="where to write the results")
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--tokens", type=int, default=MODEL["tokens"], help="tokens per micro-batch (B = tokens / S)")
    p.add_argument("--vocab", type=int, default=MODEL["vocab"])
    p.add_argument("--rope-seq", type=int, default=4096)
    p.add_argument("--rope-head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, help="device peak bf16 dense TFLOP/s (default: known devices)")
    p.add_argument("--peak-gbps", type=float, help="device peak memory bandwidth GB/s (default: known devices)")
    p.add_argument("--only", nargs="+", choices=["attention", "memory", "ce"], default=["attention", "memory", "ce"])
    p.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU via the Triton interpreter")
    args = p.parse_args(argv)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.seqs, args.head_dims, args.tokens, args.vocab, args.rope_seq = [64], [64], 64, 300, 32
        args.reps, args.warmup = 1, 0
        MODEL.update(d_model=128, ffn_hidden=96, n_kv_heads=1)
    elif not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs a CUDA device (or --smoke for a CPU plumbing check)", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    peak_tflops, peak_gbps = device_peaks(name, args.peak_tflops, args.peak_gbps)
    timer = Timer(device, args.warmup, args.reps)
    rows = []
    if "attention" in args.only:
        rows += attention_rows(args, timer, device, dtype)
    if "memory" in args.only:
        rows += memory_bound_rows(args, timer, device, dtype)
    if "ce" in args.only:
        rows += cross_entropy_rows(args, timer, device, dtype)
    rows = add_ratios(rows, peak_tflops, peak_gbps)
    import triton

    print(f"device: {name}; peaks: {peak_tflops} TFLOP/s, {peak_gbps} GB/s; dtype {dtype}; "
          f"torch {torch.__version__}, triton {triton.__version__}; median of {args.reps} reps")
    print("speedup: baseline ms / ms (baseline: sdpa-flash for attention, eager torch otherwise); "
          "vs best: fastest SDPA backend ms / ms")
    print_table(rows)
    verdict = {} if args.smoke else targets(rows)
    for k, v in verdict.items():
        print(f"target {k}: {'PASS' if v else ('not measured' if v is None else 'FAIL')}")
    if args.smoke:
        print("--smoke: interpreter timings are meaningless; targets not evaluated")
    Path(args.json).write_text(json.dumps(dict(
        device=name, dtype=str(dtype), torch=torch.__version__, triton=triton.__version__, reps=args.reps,
        peak_tflops=peak_tflops, peak_gbps=peak_gbps, model=MODEL, smoke=args.smoke, results=rows,
        targets=verdict), indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
