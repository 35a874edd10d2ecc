"""fxfuse under DistributedDataParallel, on CPU with two gloo processes (the interpreter runs the kernels).

Dynamo's DDPOptimizer splits the model's graph at gradient-bucket boundaries and compiles each piece
with the backend; the patterns must fire inside every piece, and the all-reduced gradients must equal
the single-process ones.
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxfuse
from qlora_llama import batch, build, lora_grads

LAYERS = 2
OPTIONS = {"inner": "eager"}


def _worker(rank, world, init_file, out_dir):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Built before the process group exists: transformers saves checkpoints on rank 0 only.
    model, _ = build(layers=LAYERS, twin=False)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Tiny buckets (the whole adapter set is ~100 KB): several of them, so DDPOptimizer really
        # splits the graph. DDPOptimizer wants the first bucket no larger than the others (1 MiB by default).
        dist._DEFAULT_FIRST_BUCKET_BYTES = 8 * 1024
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01)
        fxfuse.last_report().graphs.clear()
        compiled = torch.compile(ddp, backend="fxfuse", options=OPTIONS)
        grads = lora_grads(compiled, batch(seed=1, t=40))  # the same batch on both ranks
        rep = fxfuse.last_report()
        torch.save({"grads": {k.removeprefix("module."): v for k, v in grads.items()},
                    "counts": rep.counts(), "graphs": len(rep.graphs)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_patterns_fire_in_every_piece_and_gradients_match_single_process():
    out_dir = tempfile.mkdtemp(prefix="fxfuse-ddp-")
    init_file = os.path.join(out_dir, "init")
    mp.spawn(_worker, args=(2, init_file, out_dir), nprocs=2, join=True)

    model, _ = build(layers=LAYERS, twin=False)
    single = lora_grads(torch.compile(model, backend="fxfuse", options=OPTIONS), batch(seed=1, t=40))
    for rank in range(2):
        res = torch.load(os.path.join(out_dir, f"rank{rank}.pt"))
        assert res["graphs"] > 1, "DDPOptimizer did not split the graph: the test would prove nothing"
        print(f"rank {rank}: {res['graphs']} graph pieces")
        assert res["counts"] == {"rms_norm": 2 * LAYERS + 1}, res["counts"]
        assert res["grads"].keys() == single.keys()
        for name, g in single.items():
            # Both ranks saw the same batch: the average of two equal fp32 gradients is exact.
            assert torch.equal(res["grads"][name], g), name
