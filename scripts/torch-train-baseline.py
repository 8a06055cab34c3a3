#!/usr/bin/env python3
"""PyTorch training throughput on the shape of `lima_cuda_selftest --bench-train` (TinyLlama-1.1B:
D 2048, L 22, H 32, KV 4, F 5632, V 32000), the side-by-side baseline of `npm run bench:cuda-train`:
eager bf16 autocast with fp32 master weights, SDPA (causal, GQA), fused AdamW; then the same
under torch.compile. A plain LLaMA written out here so the script needs only torch.

  python3 scripts/torch-train-baseline.py [--batch B] [--seq T] [--steps N] [--model 1.1b|tiny] [--no-compile]
Prints TORCH lines: tokens/s per mode."""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = {
    "1.1b": dict(V=32000, C=2048, Fd=5632, L=22, H=32, KV=4, hd=64),
    "tiny": dict(V=32000, C=512, Fd=1376, L=4, H=8, KV=4, hd=64),
}


class Block(nn.Module):
    def __init__(self, C, Fd, H, KV, hd):
        super().__init__()
        self.H, self.KV, self.hd = H, KV, hd
        self.ln1, self.ln2 = nn.RMSNorm(C, eps=1e-5), nn.RMSNorm(C, eps=1e-5)
        self.qkv = nn.Linear(C, (H + 2 * KV) * hd, bias=False)
        self.o = nn.Linear(H * hd, C, bias=False)
        self.gate_up = nn.Linear(C, 2 * Fd, bias=False)
        self.down = nn.Linear(Fd, C, bias=False)

    def forward(self, x, cos, sin, p):
        B, T, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split([self.H * self.hd, self.KV * self.hd, self.KV * self.hd], -1)
        q = q.view(B, T, self.H, self.hd).transpose(1, 2)
        k = k.view(B, T, self.KV, self.hd).transpose(1, 2)
        v = v.view(B, T, self.KV, self.hd).transpose(1, 2)

        def rope(t):
            a, b = t.chunk(2, -1)
            return t * cos + torch.cat((-b, a), -1) * sin

        q, k = rope(q), rope(k)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + F.dropout(self.o(a.transpose(1, 2).reshape(B, T, -1)), p)
        g, u = self.gate_up(self.ln2(x)).chunk(2, -1)
        return x + F.dropout(self.down(F.silu(g) * u), p)


class Llama(nn.Module):
    def __init__(self, V, C, Fd, L, H, KV, hd):
        super().__init__()
        self.emb = nn.Embedding(V, C)
        self.blocks = nn.ModuleList(Block(C, Fd, H, KV, hd) for _ in range(L))
        self.norm = nn.RMSNorm(C, eps=1e-5)
        self.head = nn.Linear(C, V, bias=False)
        self.hd, self.L = hd, L

    def forward(self, ids, labels):
        T = ids.shape[1]
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2, device=ids.device).float() / self.hd))
        ang = torch.outer(torch.arange(T, device=ids.device).float(), inv)
        cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
        x = self.emb(ids)
        for i, b in enumerate(self.blocks):
            x = b(x, cos, sin, 0.2 * i / max(1, self.L - 1))
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def run(model, opt, ids, steps):
    dev = ids.device.type

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(ids, ids)
        loss.backward()
        opt.step()
        return loss

    step()
    step()
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    sync(dev)
    return ids.numel() * steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1.1b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda (the baseline) or cpu (a smoke test of this script)")
    a = ap.parse_args()
    torch.manual_seed(0)
    s = SHAPES[a.model]
    model = Llama(**s).to(a.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=a.device == "cuda")
    n = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    # Our batch may not fit PyTorch's activations (autocast keeps fp32 and bf16 copies): halve it
    # until it does and say so; tokens/s compare per token either way.
    batch = a.batch
    while True:
        ids = torch.randint(0, s["V"], (batch, a.seq), device=a.device)
        try:
            tps = run(model, opt, ids, a.steps)
            break
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            opt.zero_grad(set_to_none=True)
            del ids
            torch.cuda.empty_cache()
            print(f"TORCH batch {batch} x {a.seq} is out of memory; trying {batch // 2}", flush=True)
            batch //= 2
    print(f"TORCH torch {torch.__version__} on {where}: {a.model} {n} params, batch {batch} x {a.seq}", flush=True)
    print(f"TORCH train eager (bf16 autocast, SDPA, fused AdamW) {tps:10.1f} tokens/s", flush=True)
    if a.device == "cuda":
        print(f"TORCH train peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
    if not a.no_compile:
        compiled = torch.compile(model)
        print(f"TORCH train torch.compile                              {run(compiled, opt, ids, a.steps):10.1f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
