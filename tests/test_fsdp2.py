"""fxfuse under FSDP2 (`fully_shard`), on CPU with two gloo processes (the interpreter runs the kernels).

The tiny QLoRA Llama is sharded as accelerate/TRL do (each decoder layer, then the root), with the 4-bit
weights stored as bf16 (`bnb_4bit_quant_storage=torch.bfloat16`) so FSDP can shard them, compiled with
`torch.compile(model, backend="fxfuse")`; both ranks backpropagate the same batches, so the
reduce-scattered (averaged) LoRA gradient, gathered with `.full_tensor()`, is each rank's own gradient
and is held to the exactness criterion against the float64 twin (pooled RMS over 3 batches, as
qlora_llama.check_compiled_gradients does).

What fires, and why `nf4_lora` would not with bitsandbytes as it is: FSDP2 replaces each `Params4bit` by a plain
parameter (sharded DTensor; in forward, its all-gathered unsharded `nn.Parameter`), which has lost
`.quant_state`. bitsandbytes' `Linear4bit.forward` then calls `fix_4bit_weight_quant_state_from_module`,
which rebuilds a `Params4bit` around the weight in every forward; `Params4bit.__new__` assigns
`self.data = data`, and Dynamo breaks the graph there ("Failed to mutate tensor data attribute"). The
4-bit GEMM then lands alone in the graph of the resumed `Linear4bit.forward`, and PEFT's adapter path
(clone, fp32 A/B, scaling, add) in another graph: the pattern has nothing to match, the layer keeps the
stock path, and `explain` reports "a bitsandbytes 4-bit linear outside PEFT's plain LoRA form ... graph
break inside the layer". `rms_norm` fires in every layer (FSDP's hooks are `torch._dynamo.disable`d,
so each decoder layer is its own graph; the norms are whole inside them).

fxfuse ships the fix (`fxfuse/bitsandbytes_compat.py`, installed by `import fxfuse`): the same fix-up
done in place, `module.weight.quant_state = module.quant_state` on the parameter FSDP2 put there, with no
`Params4bit` rebuilt. Dynamo records the attribute store as a side effect and traces on, each LoRA layer
is whole in one graph again, and every one fires (one recompile on the second step, once the attribute
is there; FSDP2 keeps the same unsharded `nn.Parameter` object for the whole run). The
`bitsandbytes_as_is` variant restores bitsandbytes' own function and shows the graph break it causes.
"""
import os
import tempfile

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp

from fxfuse.testing import assert_exact

LAYERS = 2
OPTIONS = {"inner": "eager"}
SEEDS, T = (1, 2, 3), 96
STORAGE = torch.bfloat16


def build_fsdp_qlora(layers=LAYERS, twin=True, seed=0):
    """qlora_llama.build() with the packed 4-bit bytes stored as bf16: FSDP shards float parameters only."""
    from qlora_llama import build
    return build(layers=layers, twin=twin, seed=seed, quant_storage=STORAGE)


def _worker(rank, world, init_file, out_dir, variant):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)  # two processes on a shared CPU
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import fxfuse
    from qlora_llama import batch

    # Built before the process group exists: transformers saves checkpoints on rank 0 only.
    model, _ = build_fsdp_qlora(twin=False)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        layers = model.base_model.model.model.layers
        for layer in layers:  # as accelerate's fsdp2 auto-wrap and TRL do: each decoder layer, then the root
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if variant == "bitsandbytes_as_is":
            fxfuse.bitsandbytes_compat.restore()
        sharded = {n: type(p).__name__ for n, p in model.named_parameters()}
        torch._dynamo.utils.counters.clear()
        fxfuse.last_report().graphs.clear()
        compiled = torch.compile(model, backend="fxfuse", options=OPTIONS)
        grads, step_counts, declines, graphs = [], [], [], 0
        for s in SEEDS:
            compiled.zero_grad(set_to_none=True)
            compiled(**batch(seed=s, t=T)).loss.backward()
            grads.append({n.removeprefix("_orig_mod."): (p.grad.full_tensor() if isinstance(p.grad, DTensor)
                                                         else p.grad).detach().clone()
                          for n, p in compiled.named_parameters() if p.requires_grad})
            # What each step compiled (the first step compiles everything; later ones only recompiles).
            rep = fxfuse.last_report()
            step_counts.append(rep.counts())
            declines += [(d.pattern, d.reason) for d in rep.declines]
            graphs += len(rep.graphs)
            rep.graphs.clear()
        torch.save({"fxfuse": fxfuse.__file__, "grads": grads, "step_counts": step_counts, "graphs": graphs,
                    "sharded": sharded,
                    "grad_types": sorted({type(p.grad).__name__ for p in model.parameters() if p.grad is not None}),
                    "declines": declines, "breaks": dict(torch._dynamo.utils.counters["graph_break"])},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fsdp2_unavailable():
    if not dist.is_available():
        return "torch.distributed not built"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"FSDP2 (torch.distributed.fsdp.fully_shard) not available: {e}"
    if not dist.is_gloo_available():
        return "gloo backend not built"
    return None


_REFERENCE = {}


def _reference():
    """float64 twin and stock bf16 (unsharded, eager) LoRA gradients on the same batches."""
    if not _REFERENCE:
        from qlora_llama import batch, lora_grads
        model, twin = build_fsdp_qlora()
        ref, stock = {}, {}
        for s in SEEDS:
            for acc, m in ((ref, twin), (stock, model)):
                for name, g in lora_grads(m, batch(seed=s, t=T)).items():
                    acc.setdefault(name, []).append(g.flatten())
        _REFERENCE.update(ref={k: torch.cat(v) for k, v in ref.items()},
                          stock={k: torch.cat(v) for k, v in stock.items()})
    return _REFERENCE["ref"], _REFERENCE["stock"]


@pytest.mark.skipif(_fsdp2_unavailable() is not None, reason=str(_fsdp2_unavailable()))
@pytest.mark.parametrize("variant", ["bitsandbytes_as_is", "fxfuse"])
def test_fsdp2_gradients_exact_and_what_fires(variant, monkeypatch):
    # Spawned workers import fxfuse by path: keep them on this checkout (not another editable install).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [root, os.path.join(root, "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    out_dir = tempfile.mkdtemp(prefix="fxfuse-fsdp2-")
    mp.spawn(_worker, args=(2, os.path.join(out_dir, "init"), out_dir, variant), nprocs=2, join=True)

    ref, stock = _reference()
    for rank in range(2):
        res = torch.load(os.path.join(out_dir, f"rank{rank}.pt"))
        # The workers ran this checkout's fxfuse (PYTHONPATH), not another editable install.
        assert os.path.abspath(res["fxfuse"]).startswith(os.path.join(root, "fxfuse")), res["fxfuse"]
        counts = res["step_counts"][0]
        print(f"[{variant}] rank {rank}: {res['graphs']} graphs, counts per step {res['step_counts']}, "
              f"grads {res['grad_types']}")
        for p, r in sorted(set(res["declines"])):
            print(f"    declined {p}: {r}")
        for r, n in res["breaks"].items():
            print(f"    graph break x{n}: {r.splitlines()[0][:160]}")
        # FSDP2 really sharded: every parameter (the bf16-stored 4-bit weights included) is a DTensor,
        # and the LoRA gradients came back reduce-scattered as DTensors.
        assert set(res["sharded"].values()) == {"DTensor"}, res["sharded"]
        assert res["grad_types"] == ["DTensor"], res["grad_types"]
        assert counts.get("rms_norm") == 2 * LAYERS + 1, counts
        nf4_declined = [r for p, r in res["declines"] if p == "nf4_lora"]
        if variant == "bitsandbytes_as_is":
            # bitsandbytes' own fix-up rebuilds Params4bit in forward (FSDP2 dropped the subclass), Dynamo breaks
            # the graph at `self.data = data`, no LoRA layer is whole in one graph, and explain says so.
            assert counts.get("nf4_lora", 0) == 0, counts
            assert any("mutate tensor data" in r for r in res["breaks"]), res["breaks"]
            assert any("4-bit linear outside" in r for r in nf4_declined), res["declines"]
        else:
            assert counts.get("nf4_lora") == 7 * LAYERS and not nf4_declined, (res["step_counts"], nf4_declined)
            assert not any("mutate tensor data" in r for r in res["breaks"]), res["breaks"]
        assert res["grads"][0].keys() == ref.keys() and len(ref) == LAYERS * 7 * 2
        ratios = []
        for name in ref:
            ours = torch.cat([g[name].flatten() for g in res["grads"]])
            e = assert_exact(f"{variant} rank {rank} {name}", ours, ref[name], stock[name], max_factor=None)
            ratios.append(e["rms"] / e["stock_rms"])
        print(f"    RMS error / stock RMS error over {len(ratios)} LoRA gradients: "
              f"median {sorted(ratios)[len(ratios) // 2]:.3f}, max {max(ratios):.3f}")


def test_the_bitsandbytes_fix_up_keeps_the_parameter_and_its_state():
    """fxfuse's in-place fix-up is installed by `import fxfuse`, leaves a Params4bit that has its state alone, and
    gives a plain parameter (as FSDP2 leaves it) the module's quantization state without replacing it."""
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules as bnb_modules

    import fxfuse.bitsandbytes_compat as compat
    assert bnb_modules.fix_4bit_weight_quant_state_from_module is compat.fix_quant_state_in_place
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4")
    layer = layer.to("cpu")  # quantizes on CPU
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    before, weight = layer(x), layer.weight
    assert isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is not None and weight.shape[1] == 1
    layer(x)
    assert layer.weight is weight  # a Params4bit with its state: untouched
    plain = torch.nn.Parameter(weight.data.clone(), requires_grad=False)  # what FSDP2 puts there
    layer.quant_state = weight.quant_state
    layer.weight = plain
    assert torch.equal(layer(x), before)
    assert layer.weight is plain and plain.quant_state is weight.quant_state
    compat.restore()
    try:
        layer.weight = torch.nn.Parameter(weight.data.clone(), requires_grad=False)
        assert torch.equal(layer(x), before)
        assert isinstance(layer.weight, bnb.nn.Params4bit)  # bitsandbytes' own: the parameter rebuilt
    finally:
        compat.install()
    assert bnb_modules.fix_4bit_weight_quant_state_from_module is compat.fix_quant_state_in_place
