#!/usr/bin/env python3
"""PyTorch equivalents of the lowrank::cuda benchmarks (what a user reaches for), timed with CUDA
events (medians), then one ratio table combining them with lowrank_cuda_bench's JSON lines.

usage: gpu_torch_baselines.py OURS_JSON OUT_JSON
"""
import json
import math
import statistics
import sys

import torch


def time_ms(fn, batch=1, batches=15):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / batch)
    return statistics.median(times)


def main():
    ours_path, out_path = sys.argv[1], sys.argv[2]
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {}
    d = 16384
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        w = torch.randn(d, d, device=dev, dtype=dtype)
        w2 = torch.empty_like(w)
        res[f"copy {name}"] = time_ms(lambda: w2.copy_(w))
        for r in (1, 16):
            u = torch.randn(d, r, device=dev, dtype=dtype) * 1e-3
            v = torch.randn(d, r, device=dev, dtype=dtype) * 1e-3
            if r == 1:
                uu, vv = u[:, 0].contiguous(), v[:, 0].contiguous()
                res[f"torch rank_update {name} r=1"] = time_ms(lambda: w.addr_(uu, vv, alpha=0.5))
            else:
                res[f"torch rank_update {name} r=16"] = time_ms(lambda: w.addmm_(u, v.t(), alpha=0.5))
        del w, w2
        torch.cuda.empty_cache()
    dm, r = 4096, 16
    for tokens in (1, 16, 256, 4096):
        dtype = torch.bfloat16
        sets = [(torch.randn(tokens, dm, device=dev, dtype=dtype), torch.randn(dm, dm, device=dev, dtype=dtype) * 0.02,
                 torch.randn(r, dm, device=dev, dtype=dtype) * 0.02, torch.randn(dm, r, device=dev, dtype=dtype) * 0.02)
                for _ in range(3)]
        it = [0]

        def base():
            x, w, _, _ = sets[it[0] % 3]
            it[0] += 1
            return x @ w.t()

        def lora():
            x, w, a, b = sets[it[0] % 3]
            it[0] += 1
            return x @ w.t() + 2.0 * ((x @ a.t()) @ b.t())

        batch = 20 if tokens <= 256 else 3
        res[f"torch base bf16 tokens={tokens}"] = time_ms(base, batch)
        res[f"torch lora bf16 tokens={tokens}"] = time_ms(lora, batch)
        del sets
    # Batched low-rank ES forward from torch ops (noise drawn with torch.randn each call).
    n, sigma = 2048, 0.01
    for rr in (1, 4):
        dtype = torch.bfloat16
        x = torch.randn(n, dm, device=dev, dtype=dtype)
        w = torch.randn(dm, dm, device=dev, dtype=dtype) * 0.02
        sign = torch.tensor([1.0, -1.0], device=dev, dtype=dtype).repeat(n // 2)[:, None]

        def es():
            a = torch.randn(n // 2, dm, rr, device=dev, dtype=dtype)
            b = torch.randn(n // 2, dm, rr, device=dev, dtype=dtype)
            a = a.repeat_interleave(2, dim=0)
            b = b.repeat_interleave(2, dim=0)
            t = torch.bmm(x[:, None, :], b)  # n x 1 x r
            low = torch.bmm(t, a.transpose(1, 2))[:, 0, :]
            return x @ w.t() + (sigma / math.sqrt(rr)) * sign * low

        res[f"torch base bf16 N={n}"] = time_ms(lambda: x @ w.t(), 5)
        res[f"torch es bf16 N={n} r={rr}"] = time_ms(es, 3)
    # Randomized SVD: torch.svd_lowrank on the recipe of lowrank_cuda_bench's bench_svd (512
    # directions with weights 1 / (1 + i / 16) plus noise), fp32, no TF32; time and the captured
    # energy of its top k singular values.
    m = n = 4096
    k, q, niter = 128, 138, 2
    u0 = torch.randn(m, 512, device=dev) / math.sqrt(m * n)
    u0 *= 1.0 / (1.0 + torch.arange(512, device=dev, dtype=torch.float32) / 16.0)
    v0 = torch.randn(n, 512, device=dev)
    a_svd = u0 @ v0.t() + torch.randn(m, n, device=dev) * (1e-2 / math.sqrt(m * n))
    del u0, v0

    def svd_lowrank():
        return torch.svd_lowrank(a_svd, q=q, niter=niter)

    res[f"torch svd_lowrank {m}x{n} q={q} niter={niter}"] = time_ms(svd_lowrank, 1, 9)
    _, s_svd, _ = svd_lowrank()
    res[f"torch svd_lowrank energy k={k}"] = float((s_svd[:k].double() ** 2).sum() / a_svd.double().norm() ** 2)
    del a_svd
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)

    ours = {}
    with open(ours_path) as f:
        for line in f:
            line = line.strip()
            if line:
                e = json.loads(line)
                ours[e["name"]] = e
    print()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'case':46s} {'lowrank':>10s} {'limit':>10s} {'ours':>7s} {'torch':>7s}  ratio meaning")
    rows = []
    for name in ("fp32", "bf16"):
        copy = res[f"copy {name}"]
        for r_ in (1, 16):
            key = f"rank_update {name} 16384^2 r={r_}"
            t = res[f"torch rank_update {name} r={r_}"]
            if key in ours:
                o = ours[key]
                rows.append((key, o["ms"], o["baseline_ms"], o["ratio"], copy / t, "fraction of copy BW (>= 0.90)"))
    for tokens in (1, 16, 256, 4096):
        key = f"lora_forward bf16 d=4096 r=16 tokens={tokens}"
        tb, tl = res[f"torch base bf16 tokens={tokens}"], res[f"torch lora bf16 tokens={tokens}"]
        if key in ours:
            o = ours[key]
            rows.append((key, o["ms"], o["baseline_ms"], o["ratio"], tl / tb, "time over base GEMM (<= 1.10)"))
    for rr in (1, 4):
        key = f"eggroll_forward bf16 d=4096 N=2048 r={rr}"
        tb, te = res["torch base bf16 N=2048"], res[f"torch es bf16 N=2048 r={rr}"]
        if key in ours:
            o = ours[key]
            rows.append((key, o["ms"], o["baseline_ms"], o["ratio"], tb / te, "throughput vs inference (>= 0.90)"))
    key = "truncated_svd fp32 4096x4096 k=128 q=138 niter=2"
    if key in ours:
        o = ours[key]
        tt = res["torch svd_lowrank 4096x4096 q=138 niter=2"]
        te = res["torch svd_lowrank energy k=128"]
        rows.append((key, o["ms"], tt, tt / o["ms"], float("nan"), "speed vs torch.svd_lowrank (>= 1)"))
        print(f"  (randomized SVD captured energy of the top 128: lowrank {o['ratio']:.8f}, torch.svd_lowrank {te:.8f};"
              f" 'limit' column = torch's ms)")
    for key, ms, lim, ratio, tratio, meaning in rows:
        print(f"{key:46s} {ms:10.4f} {lim:10.4f} {ratio:7.3f} {tratio:7.3f}  {meaning}")
    for key, e in ours.items():
        if not any(key == r_[0] for r_ in rows):
            print(f"{key:46s} {e['ms']:10.4f} {e['baseline_ms']:10.4f} {e['ratio']:7.3f} {'':>7s}  {e['ratio_kind']}")


if __name__ == "__main__":
    main()
