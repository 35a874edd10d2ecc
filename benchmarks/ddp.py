"""fxfuse under DDP on several GPUs of one host (NCCL): the gradient check and the step benchmark.

    python benchmarks/ddp.py [--gpus 2] [--layers 4] [--seq 2048] [--batch 2] [--out benchmarks/results/ddp.json]

1. check: on every rank, a tiny QLoRA Llama wrapped in DDP (small buckets, so Dynamo's DDPOptimizer
   splits the graph), compiled with fxfuse, backward on the same three batches on all ranks (so the
   all-reduced average is each rank's own gradient); every LoRA gradient must meet the exactness
   criterion against the float64 twin (RMS, pooled over the batches, as tests/test_distributed.py
   does on gloo), and each pattern must fire in the pieces or say why not.
2. step: the workload of DESIGN.md at 4 layers (Llama-3-8B shapes, NF4 double quant, LoRA r=16 on all
   linears, checkpointing, AdamW), batch `--batch` x `--seq` per GPU, once on one GPU (its own process)
   and once under DDP on `--gpus` GPUs; median step time and tokens/s; scaling efficiency =
   tokens/s on N GPUs / (N x tokens/s on one).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends), as the machines require.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v

import torch  # noqa: E402

from foundation import LLAMA3_8B  # noqa: E402


def _steps(run, opt, inputs, warmup, steps):
    times, losses = [], []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        loss = run(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return times, losses


def _step_model(args, device):
    from qlora_llama import build
    model, _ = build(layers=args.layers, checkpointing=True, double_quant=True, device=device, twin=False, rank=16,
                     **LLAMA3_8B)
    return model


def single(args) -> dict:
    import fxfuse
    from qlora_llama import batch
    model = _step_model(args, "cuda:0")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    run = torch.compile(model, backend="fxfuse")
    inputs = batch(vocab=LLAMA3_8B["vocab_size"], b=args.batch, t=args.seq, seed=1, device="cuda:0")
    torch.cuda.reset_peak_memory_stats()  # the training peak, not the model build's
    times, losses = _steps(run, opt, inputs, args.warmup, args.steps)
    med = statistics.median(times[args.warmup:])
    return {"median_step_ms": 1e3 * med, "tokens_per_s": args.batch * args.seq / med, "first_step_s": times[0],
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "losses": losses,
            "fired": fxfuse.last_report().counts()}


def _worker(rank, world, init_file, args, out_dir):
    import torch.distributed as dist

    import fxfuse
    from fxfuse.testing import assert_exact
    from qlora_llama import batch, build, lora_grads
    torch.cuda.set_device(rank)
    device = f"cuda:{rank}"
    result = {"rank": rank}
    # Models are built before the process group exists: transformers saves on rank 0 only.
    tiny, twin = build(layers=2, device=device)
    big = _step_model(args, device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            device_id=torch.device(device))
    try:
        # 1. the check
        dist._DEFAULT_FIRST_BUCKET_BYTES = 8 * 1024
        ddp = torch.nn.parallel.DistributedDataParallel(tiny, device_ids=[rank], bucket_cap_mb=0.01)
        fxfuse.last_report().graphs.clear()
        compiled = torch.compile(ddp, backend="fxfuse")
        ours, ref, stock = {}, {}, {}
        for seed in (1, 2, 3):
            inputs = batch(seed=seed, t=96, device=device)
            for acc, m in ((ours, compiled), (ref, twin), (stock, tiny)):
                for name, g in lora_grads(m, inputs).items():
                    acc.setdefault(name.removeprefix("module."), []).append(g.flatten())
        rep = fxfuse.last_report()
        result["check_counts"], result["check_graphs"] = rep.counts(), len(rep.graphs)
        result["check_declines"] = [f"{d.pattern}: {d.reason}" for d in rep.declines]
        ratios = {}
        for name in ref:
            e = assert_exact(name, torch.cat(ours[name]), torch.cat(ref[name]), torch.cat(stock[name]),
                             max_factor=None)
            ratios[name] = e["rms"] / e["stock_rms"]
        result["check_tensors"] = len(ref)
        result["check_worst_ratio"] = max(ratios.values())

        # 2. the step (a different batch per rank, as in data-parallel training)
        torch.cuda.reset_peak_memory_stats()
        model = torch.nn.parallel.DistributedDataParallel(big, device_ids=[rank])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        fxfuse.last_report().graphs.clear()
        run = torch.compile(model, backend="fxfuse")
        inputs = batch(vocab=LLAMA3_8B["vocab_size"], b=args.batch, t=args.seq, seed=1 + rank, device=device)
        times, losses = _steps(run, opt, inputs, args.warmup, args.steps)
        result.update(times=times, losses=losses, peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                      fired=fxfuse.last_report().counts(), graphs=len(fxfuse.last_report().graphs))
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ddp.json"))
    args = ap.parse_args()
    if args.single:
        print("RESULT " + json.dumps(single(args)))
        return
    if torch.cuda.device_count() < args.gpus:
        sys.exit(f"need {args.gpus} GPUs, found {torch.cuda.device_count()}")

    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--single", "--layers", str(args.layers),
                           "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
                           "--warmup", str(args.warmup)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    one = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-800:]}
    print("one GPU:", {k: v for k, v in one.items() if k != "losses"}, flush=True)

    import torch.multiprocessing as mp
    out_dir = tempfile.mkdtemp(prefix="fxfuse-ddp-")
    mp.spawn(_worker, args=(args.gpus, os.path.join(out_dir, "init"), args, out_dir), nprocs=args.gpus, join=True)
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(args.gpus)]
    # A DDP step ends when the slowest rank does: the step time is the max over ranks, per step.
    step_times = [max(r["times"][i] for r in ranks) for i in range(args.warmup, args.warmup + args.steps)]
    med = statistics.median(step_times)
    tps = args.gpus * args.batch * args.seq / med
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "gpus": args.gpus,
           "layers": args.layers, "batch_per_gpu": args.batch, "seq": args.seq, "one_gpu": one,
           "ddp": {"median_step_ms": 1e3 * med, "tokens_per_s": tps, "ranks": ranks},
           "scaling_efficiency": tps / (args.gpus * one["tokens_per_s"]) if "tokens_per_s" in one else None}
    for r in ranks:
        print(f"rank {r['rank']}: check PASS ({r['check_tensors']} LoRA grads, worst RMS ratio to stock "
              f"{r['check_worst_ratio']:.3f}, "
              f"{r['check_graphs']} graph pieces, fired {r['check_counts']}); step fired {r['fired']} in "
              f"{r['graphs']} pieces, peak {r['peak_gib']:.2f} GiB, losses {[round(x, 4) for x in r['losses'][:3]]}")
    print(f"\n| setup | median step ms | tokens/s | scaling efficiency |\n|---|---|---|---|")
    if "tokens_per_s" in one:
        print(f"| 1 GPU, batch {args.batch} x {args.seq} | {one['median_step_ms']:.1f} | {one['tokens_per_s']:.0f} | |")
    eff = res["scaling_efficiency"]
    print(f"| DDP {args.gpus} GPUs, batch {args.batch} x {args.seq} per GPU | {1e3 * med:.1f} | {tps:.0f} | "
          f"{'n/a' if eff is None else f'{100 * eff:.1f}%'} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
