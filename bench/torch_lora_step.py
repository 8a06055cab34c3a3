"""PyTorch CPU baseline for a LoRA step: the base frozen (no gradients), adapters A [r, in] and
B [out, r] on the q/k/v/o/gate/up/down projections of every layer trained with AdamW, the forward
and loss under torch.autocast("cpu", bfloat16) with --bf16 (adapters and AdamW in fp32), as a
plain PyTorch LoRA step does. The model is the reference's (../shared/reference/llama_ref.py, its
`lora=` argument); this file only builds the adapters and times steps. Prints one JSON line.

  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE /usr/bin/python3 bench/torch_lora_step.py \
      --reference ../shared/reference --hidden 768 --ffn 2048 --layers 12 --heads 12 --kv-heads 12 --batch 2 --seq 512 --r 16 --bf16
"""
import argparse, json, math, os, sys, time

ap = argparse.ArgumentParser()
for k, v in dict(vocab=32000, hidden=288, ffn=768, layers=6, heads=6, kv_heads=6, batch=4, seq=256,
                 steps=3, threads=os.cpu_count(), r=16).items():
    ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
ap.add_argument("--alpha", type=float, default=32.0)
ap.add_argument("--bf16", action="store_true")
ap.add_argument("--reference", required=True, help="the folder of llama_ref.py")
a = ap.parse_args()
sys.path.insert(0, os.path.abspath(a.reference))
import torch
from llama_ref import Cfg, hf_config, init_weights, forward, loss_sum, LORA_TARGETS

torch.set_num_threads(a.threads)
cfg = Cfg(hf_config(a.vocab, a.hidden, a.ffn, a.layers, a.heads, a.kv_heads))
w = init_weights(cfg)  # frozen: no requires_grad
g = torch.Generator().manual_seed(1)
lora = {"scale": a.alpha / a.r}
params = []
for n, t in w.items():
    mod = n[: -len(".weight")]
    if n.startswith("model.layers.") and mod.rsplit(".", 1)[-1] in LORA_TARGETS:
        out_f, in_f = t.shape
        A = ((torch.rand(a.r, in_f, generator=g) * 2 - 1) / math.sqrt(in_f)).requires_grad_(True)
        B = (torch.randn(out_f, a.r, generator=g) * 0.02).requires_grad_(True)
        lora[mod] = (A, B)
        params += [A, B]
opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
ids = torch.randint(0, a.vocab, (a.batch, a.seq))


def step():
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
        s, n = loss_sum(forward(cfg, w, ids, lora=lora).float(), ids)
    (s / n).backward()
    opt.step()


step()
times = []
for _ in range(a.steps):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
times.sort()
med = times[len(times) // 2]
print(json.dumps({"impl": "pytorch-" + torch.__version__ + "-lora" + ("-autocast-bf16" if a.bf16 else ""),
                  "trainable": sum(p.numel() for p in params), "batch": a.batch, "seq": a.seq, "threads": a.threads,
                  "step_s_median": round(med, 4), "tokens_per_s": round(a.batch * a.seq / med, 1)}))
