#!/usr/bin/env python3
"""PyTorch on the shapes of `lima_cuda_selftest --bench`, the side-by-side baseline of
scripts/device-check.sh: D2D copy, bf16 matmul 8192^3, fused AdamW over 256M fp32 params,
dropout-add, rms_norm, cross-entropy fwd+bwd, SDPA causal bf16 (T 4096, D 128 / 64,
H = 2048 / D, and the 1.1B model's T 2048 H 32 KV 4 D 64) forward and backward. Prints TORCH lines; byte counts as in the self-test."""
import time

import torch


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps  # ms


def line(what, value, unit):
    print(f"TORCH {what:<46} {value:10.1f} {unit}", flush=True)


def main():
    dev = torch.device("cuda")
    print(f"TORCH torch {torch.__version__} on {torch.cuda.get_device_name(0)}", flush=True)
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 10)
    line("copy D2D 1 GiB", 2 * n / (ms * 1e6), "GB/s")
    del src, dst

    g = 8192
    a = torch.randn(g, g, device=dev, dtype=torch.bfloat16)
    b = torch.randn(g, g, device=dev, dtype=torch.bfloat16)
    ms = timed(lambda: a @ b.t(), 5)
    line("matmul bf16 8192^3 x.W^T", 2 * g**3 / (ms * 1e9), "TFLOP/s")
    del a, b

    p = torch.zeros(1 << 28, device=dev, dtype=torch.float32, requires_grad=True)
    p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW([p], lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ms = timed(opt.step, 5)
    # Same byte count as ours minus the bf16 copy PyTorch does not write: p, m, v, g read; p, m, v written.
    line("fused AdamW 256M params", 28 * (1 << 28) / (ms * 1e6), "GB/s")
    del p, opt

    nd = 1 << 28
    r = torch.zeros(nd, device=dev, dtype=torch.bfloat16)
    x = torch.zeros(nd, device=dev, dtype=torch.bfloat16)
    ms = timed(lambda: r + torch.nn.functional.dropout(x, 0.1), 5)
    line("dropout-add bf16 256M (eager, unfused)", 3 * 2 * nd / (ms * 1e6), "GB/s")
    del r, x

    n_rows, c = 16384, 2048
    xs = torch.randn(n_rows, c, device=dev, dtype=torch.bfloat16)
    w = torch.ones(c, device=dev, dtype=torch.bfloat16)
    ms = timed(lambda: torch.nn.functional.rms_norm(xs, (c,), w, 1e-5), 10)
    line("rms_norm fwd bf16 16384x2048", 2 * 2 * n_rows * c / (ms * 1e6), "GB/s")
    del xs

    n_rows, v = 8192, 32000
    logits = torch.zeros(n_rows, v, device=dev, dtype=torch.bfloat16, requires_grad=True)
    tgt = torch.zeros(n_rows, device=dev, dtype=torch.long)
    ms = timed(lambda: torch.autograd.grad(torch.nn.functional.cross_entropy(logits, tgt), logits), 5)
    line("cross_entropy fwd+bwd bf16 8192x32000", 2 * 2 * n_rows * v / (ms * 1e6), "GB/s")
    del logits

    # The shapes of lima_cuda_selftest --bench: T 4096 at D 128 and 64, then the 1.1B model's
    # (H 32, KV 4: grouped-query attention, K/V not expanded).
    for b, t, h, kv, d in ((1, 4096, 16, 16, 128), (1, 4096, 32, 32, 64), (1, 2048, 32, 4, 64)):
        q = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(b, kv, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        flops = 4 * b * h * t * t * d / 2
        f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)
        ms = timed(f, 10)
        tag = f"causal T{t} H{h} KV{kv} D{d}"
        line(f"SDPA fwd bf16 {tag}", flops / (ms * 1e9), "TFLOP/s")
        o = f()
        do = torch.randn_like(o)
        ms_fb = timed(lambda: torch.autograd.grad(f(), (q, k, v), do), 5)
        line(f"SDPA bwd bf16 {tag}", 2.5 * flops / ((ms_fb - ms) * 1e9), "TFLOP/s")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"TORCH done in {time.time() - t0:.1f} s", flush=True)
