"""The `fxfuse` torch.compile backend: canonicalize, rewrite with patterns, hand the rest on.

    torch.compile(model, backend="fxfuse", options={"inner": "eager", "disable": ["rms_norm"]})

Options (all optional):
  patterns  list of pattern names to use (default: the built-in patterns enabled by default)
  enable    list of pattern names to use in addition to the default ones
  disable   list of pattern names not to use
  extra_patterns  list of `fxfuse.Pattern` objects to try after the built-in ones
  inner     how the rest of the graph runs: "inductor" (default), "aot_eager" or "eager"
  inductor_config  dict of Inductor config patches, with inner="inductor"
              (fxfuse sets emulate_precision_casts=True unless you say otherwise: Inductor then rounds
              at every cast the model wrote, as eager does)
  regional  compile a repeated layer once and reuse the code for its twins (default True; False
              compiles each graph whole). `explain` says how each graph was cut, or why it was not.
  offload_layer_inputs  with regional compilation on CUDA, keep the inputs each layer saves for its
              backward in pinned host memory until then (default True; not under Inductor's CUDA graphs)

The default inner compiler is Inductor: measured faster and leaner than eager on the QLoRA step
(benchmarks/RESULTS.md, "Foundation").
"""
from __future__ import annotations

import contextvars
import logging
import operator
import time
from collections import Counter

import torch
import torch.fx as fx

from . import ops  # noqa: F401  (registers the custom ops before any graph uses them)
from .canonicalize import OPERANDS_META, canon, canonicalize, recompile_alone, subgraphs
from .matcher import (OUTPUT_FIXUPS_META, TOP_LEVEL_META, Decline, Pattern, PatternError, apply_match, find_matches,
                      module_path)
from .ops.library import (KernelError, describe, disable_hint, failed_kernel, is_kernel_failure, kernel_named_in,
                          note_pattern_ops)
from .regional import RegionalSummary, compile_regions
from .report import MatchRecord, Report

__all__ = ["fxfuse_backend", "validate_options", "last_report", "INNER_COMPILERS"]

log = logging.getLogger("fxfuse")

INNER_COMPILERS = ("eager", "aot_eager", "inductor")
DEFAULT_INNER = "inductor"
# Eager's rounding at every explicit cast (`.to(bfloat16)`), kept under Inductor's fusion.
_INDUCTOR_DEFAULTS = {"emulate_precision_casts": True}
_OPTION_KEYS = {"patterns", "enable", "disable", "extra_patterns", "inner", "inductor_config", "attention",
                "regional", "offload_layer_inputs"}
# The options of the graph being rewritten, for constraints that depend on them (current_options()).
_CURRENT_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("fxfuse_options", default={})

# The report of everything compiled since import (or since `last_report().graphs.clear()`).
_LAST = Report()


def current_options() -> dict:
    """The validated options of the graph being rewritten ({} outside a rewrite)."""
    return _CURRENT_OPTIONS.get()


def last_report() -> Report:
    """Report of every graph the backend has compiled in this process."""
    return _LAST


def _builtin():
    from .patterns import BUILTIN_PATTERNS
    return BUILTIN_PATTERNS


def validate_options(options) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"fxfuse options must be a dict, got {type(options).__name__}")
    unknown = set(options) - _OPTION_KEYS
    if unknown:
        raise ValueError(f"unknown fxfuse option(s) {sorted(unknown)}; known: {sorted(_OPTION_KEYS)}")
    names = {p.name for p in _builtin()}
    extra = options.get("extra_patterns", ())
    if not isinstance(extra, (list, tuple)) or not all(isinstance(p, Pattern) for p in extra):
        raise TypeError("option 'extra_patterns' must be a list of fxfuse.Pattern")
    names |= {p.name for p in extra}
    for key in ("patterns", "enable", "disable"):
        val = options.get(key)
        if val is None:
            continue
        if isinstance(val, str) or not isinstance(val, (list, tuple, set)):
            raise TypeError(f"option {key!r} must be a list of pattern names, got {val!r}")
        bad = set(val) - names
        if bad:
            raise ValueError(f"option {key!r}: unknown pattern(s) {sorted(bad)}; known: {sorted(names)}")
    inner = options.get("inner", DEFAULT_INNER)
    if inner not in INNER_COMPILERS:
        raise ValueError(f"option 'inner' must be one of {INNER_COMPILERS}, got {inner!r}")
    if "inductor_config" in options and not isinstance(options["inductor_config"], dict):
        raise TypeError("option 'inductor_config' must be a dict")
    for key in ("regional", "offload_layer_inputs"):
        if not isinstance(options.get(key, True), bool):
            raise TypeError(f"option {key!r} must be True or False, got {options[key]!r}")
    from .patterns.attention import ATTENTION_POLICIES
    if options.get("attention", "measured") not in ATTENTION_POLICIES:
        raise ValueError(f"option 'attention' must be one of {ATTENTION_POLICIES}, got {options['attention']!r}")
    return options


def _cuda_graphs(options) -> bool:
    # Inductor's CUDA graphs keep their outputs in a memory pool of their own and check which are still
    # alive; the layer-input offload, which frees saved tensors early, is not tried under them.
    return bool(options.get("inductor_config", {}).get("triton.cudagraphs", False))


def _selected_patterns(options) -> tuple[list[Pattern], list[str]]:
    patterns = list(_builtin()) + list(options.get("extra_patterns", ()))
    wanted = options.get("patterns")
    off_by_default = set()
    if wanted is None:
        off_by_default = {p.name for p in patterns if not p.enabled_by_default} - set(options.get("enable", ()))
        wanted = {p.name for p in patterns} - off_by_default
    disabled = set(options.get("disable", ())) | {p.name for p in patterns if p.name not in set(wanted)}
    return [p for p in patterns if p.name not in disabled], sorted(disabled - off_by_default), sorted(off_by_default)


def _count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for _, sub in subgraphs(gm) for n in sub.graph.nodes if n.op in ("call_function", "call_method"))


def rewrite(gm: fx.GraphModule, patterns: list[Pattern], graph_report, fake_mode=None) -> None:
    """Canonicalize `gm` and apply every pattern, in every transparent subgraph, in place."""
    notes, changed = [], set()
    canonicalize(gm, notes, sdpa_causal=current_options().get("attention") != "never", changed=changed)
    graph_report.post_passes.extend(f"canonical form: {line}" for line in notes)
    graph_report.total_nodes = _count_nodes(gm)
    gm.meta[TOP_LEVEL_META] = True
    for _, sub in subgraphs(gm):
        fired = []
        had_users = {n for n in sub.graph.nodes if n.users}
        for pattern in patterns:
            matches, declines = find_matches(pattern, sub, fake_mode)
            graph_report.declines.extend(declines)
            for m in matches:
                apply_match(m)
                note_pattern_ops(pattern.name, m.ops)
                graph_report.matches.append(MatchRecord(pattern.name, module_path(m.root), m.root.name, len(m.nodes)))
            if matches:
                fired.append(pattern)
        _explain_unmatched_anchors(sub, patterns, graph_report)
        if fired:  # the post passes count a value's users: not the replaced regions' dead producers
            _erase_dead_producers(sub.graph, had_users)
        for pattern in fired:
            if pattern.post_pass is not None:
                graph_report.post_passes.extend(f"{pattern.name}: {line}" for line in pattern.post_pass(sub))
        if fired:
            _erase_dead_producers(sub.graph, had_users)
            sub.graph.lint()
        if fired or sub in changed:
            recompile_alone(sub)


def _erase_dead_producers(graph: fx.Graph, had_users: set) -> None:
    """Erase what the rewrite left without users (a replaced region's producers, e.g. the bitsandbytes
    autograd_function_apply whose output 0 a pattern consumed: it must not run), and their producers
    in turn. Only nodes that had users before, and unused `getitem`s of them (output 1 of that
    autograd_function_apply): any other node Dynamo put in the graph without users runs for its side
    effect (`Tensor.set_` of a parameter, an in-place method on a buffer), which FX's
    eliminate_dead_code would drop, since it takes every call_method for pure."""
    def dead(n):
        if n.users or n.op in ("placeholder", "output"):
            return False
        # fxfuse's own entry points (fxfuse.ops) are pure: one a post pass made and a later one
        # superseded (a rope_qk whose rotation moved into the attention kernel) must not run.
        return n in had_users or (n.op == "call_function" and (
            n.target is operator.getitem or getattr(n.target, "__module__", "").startswith("fxfuse.ops.")))
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph.nodes)):
            if dead(n):
                graph.erase_node(n)
                changed = True


def _explain_unmatched_anchors(gm: fx.GraphModule, patterns: list[Pattern], graph_report) -> None:
    # Already explained: a node, or a module (or its parent) where the pattern recorded a near miss
    # with its reason (the anchor of PEFT's q_proj lies in q_proj.base_layer), or a node within the
    # pattern's reach upstream of a declined root (a top-level module has no path to tell regions apart).
    # A node where any pattern declined is explained too: the attention patterns share their root, and
    # the one whose form it is (e.g. sdpa_attention_causal_gqa) says why it did not fire.
    declined_nodes = {d.node for d in graph_report.declines}
    declined_at = {(d.pattern, d.where) for d in graph_report.declines if d.where != "<top>"}
    by_name = {n.name: n for n in gm.graph.nodes}

    def upstream(pattern):
        reach = set()
        for d in graph_report.declines:
            if d.pattern != pattern.name or d.node not in by_name:
                continue
            frontier = [by_name[d.node]]
            for _ in range(pattern.op_count()):
                frontier = [i for n in frontier for i in n.all_input_nodes if i not in reach]
                reach.update(frontier)
        return reach

    def explained(pattern, node, reach):
        path = module_path(node)
        return node.name in declined_nodes or node in reach or any(
            p == pattern.name and (path == w or path.startswith(w + ".")) for p, w in declined_at)

    fp32_graph = _computes_in_float32(gm)
    graph_keys = {c.key for n in gm.graph.nodes if n.op in ("call_function", "call_method") and (c := canon(n))}
    fired = {m.pattern for m in graph_report.matches}
    declined_kinds = {canon(by_name[d.node]).key for d in graph_report.declines
                      if d.node in by_name and by_name[d.node].op == "call_function" and canon(by_name[d.node])}
    for pattern in patterns:
        if pattern.anchor is None:
            # In an fp32 graph the casts the references are written with are no-ops, which the canonical form
            # drops, so such a pattern does not even come close to matching: say why once for the graph,
            # unless a pattern with the same root op already declined there (the attention variants).
            if fp32_graph and pattern.name not in fired and _has_its_ops_but_casts(pattern, graph_keys) \
                    and pattern.graph().meta["fxfuse_root"].meta["fxfuse_canon"].key not in declined_kinds \
                    and not any(p == pattern.name for p, _ in declined_at):
                graph_report.declines.append(Decline(pattern.name, "<graph>", "", FLOAT32_REASON))
            continue
        keys = (pattern.anchor,) if isinstance(pattern.anchor, str) else tuple(pattern.anchor)
        reach = upstream(pattern)
        for n in gm.graph.nodes:
            c = canon(n) if n.op == "call_function" else None
            if c is not None and c.key in keys and not explained(pattern, n, reach):
                reason = FLOAT32_REASON if fp32_graph else _anchor_reason(pattern, n)
                graph_report.declines.append(Decline(pattern.name, module_path(n), n.name, reason))


def _anchor_reason(pattern: Pattern, node: fx.Node) -> str:
    if isinstance(pattern.anchor_reason, str):
        return pattern.anchor_reason
    reason = pattern.anchor_reason(node)
    if not isinstance(reason, str) or not reason:
        raise PatternError(f"pattern {pattern.name!r}: anchor_reason({node.name}) returned {reason!r}, "
                           f"not a non-empty string")
    return reason


FLOAT32_REASON = ("the graph computes in torch.float32 (no bfloat16 or float16 tensor in it): fxfuse's kernels "
                  "take bf16/fp16, so an fp32 model keeps the stock path")


def _has_its_ops_but_casts(pattern: Pattern, graph_keys: set) -> bool:
    """Whether the graph has every kind of op `pattern`'s reference has, its casts apart (a place where the
    pattern would have fired but for them), so that a graph with nothing of the kind gets no decline."""
    keys = {c.key for n in pattern.graph().graph.nodes if n.op in ("call_function", "call_method")
            and (c := n.meta.get("fxfuse_canon")) is not None and c.key != "to"}
    return keys <= graph_keys


def _computes_in_float32(gm: fx.GraphModule) -> bool:
    """Whether `gm`'s floating-point values are all float32 or float64 (an fp32 model), with at least one."""
    dtypes = set()
    for _, sub in subgraphs(gm):
        for n in sub.graph.nodes:
            v = n.meta.get("example_value")
            if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
                dtypes.add(v.dtype)
    return bool(dtypes) and dtypes <= {torch.float32, torch.float64}


def _inner_compile(gm, example_inputs, options, name_failures=None):
    """The rest of the graph handed to the inner compiler. `name_failures(exc)`, if given, turns a Triton
    failure while Inductor compiles the forward or (later, at the first backward) the backward into the
    error to raise."""
    inner = options.get("inner", DEFAULT_INNER)
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import compile_fx as inductor
    patches = {**_INDUCTOR_DEFAULTS, **options.get("inductor_config", {})}
    if name_failures is None:
        return inductor.compile_fx(gm, example_inputs, config_patches=patches)

    def compile_inner(*args, **kwargs):
        try:
            return inductor.compile_fx_inner(*args, **kwargs)
        except KernelError:
            raise
        except Exception as exc:
            if not is_kernel_failure(exc):
                raise
            raise name_failures(exc, "backward" if kwargs.get("is_backward") else "forward") from exc
    return inductor.compile_fx(gm, example_inputs, inner_compile=compile_inner, config_patches=patches)


def _replaced_shapes(gm: fx.GraphModule) -> dict[str, list[str]]:
    """pattern name -> the distinct outputs (dtype and shape) of its replacements in `gm`."""
    shapes: dict[str, list[str]] = {}
    for _, sub in subgraphs(gm):
        for n in sub.graph.nodes:
            if "fxfuse_pattern" in n.meta:
                seen = shapes.setdefault(n.meta["fxfuse_pattern"], [])
                shape = describe(n.meta.get("example_value"))
                if shape not in seen:
                    seen.append(shape)
    return shapes


def _graph_kernel_error(exc: BaseException, graph_report, shapes: dict, when: str) -> KernelError:
    """A Triton failure in a compiled graph (Inductor compiling or launching fxfuse's kernels) named
    with the graph's patterns and the shapes of what they replaced."""
    kernel = failed_kernel(exc) or kernel_named_in(f"{exc} {exc.__cause__}")
    counts = Counter(m.pattern for m in graph_report.matches)
    fired = sorted(counts)
    listed = "; ".join(f"{p} x{counts[p]} (outputs {', '.join(shapes.get(p, [])) or '?'})" for p in fired)
    return KernelError(
        f"fxfuse: a Triton kernel{' ' + kernel if kernel else ''} failed {when} graph {graph_report.index}, "
        f"where fxfuse replaced: {listed or 'nothing'}: {type(exc).__name__}: {exc} | {disable_hint(fired)}")


def _guarded(compiled, fixups, graph_report, shapes):
    """`compiled` with the post passes' output fixups applied to what it returns (Pattern.post_pass),
    and a Triton failure while it runs raised as a KernelError naming the graph's patterns."""
    boxed = getattr(compiled, "_boxed_call", False)

    def run(*args):
        try:
            outputs = compiled(*args)
        except KernelError:
            raise
        except Exception as exc:
            if not is_kernel_failure(exc):
                raise
            raise _graph_kernel_error(exc, graph_report, shapes, "while running") from exc
        if not fixups:
            return outputs
        outputs = list(outputs)
        for fix in reversed(fixups):
            fix(outputs)
        return outputs
    run._boxed_call = boxed  # the same calling convention as the inner compiled function
    return run


def fxfuse_backend(gm: fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None,
                   report: Report | None = None):
    """torch.compile backend entry point (registered as "fxfuse")."""
    options = validate_options(options)
    if mode not in (None, "default"):
        log.info("fxfuse ignores torch.compile mode=%r", mode)
    patterns, disabled, off_by_default = _selected_patterns(options)
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    graph_report = (report or _LAST).new_graph()
    graph_report.disabled = disabled
    graph_report.off_by_default = off_by_default
    graph_report.inner = options.get("inner", DEFAULT_INNER)
    token = _CURRENT_OPTIONS.set(options)
    start = time.perf_counter()
    try:
        rewrite(gm, patterns, graph_report, fake_mode)
    finally:
        _CURRENT_OPTIONS.reset(token)
    graph_report.rewrite_s = time.perf_counter() - start
    if report is not None:  # explain(): keep the process-wide record complete too
        _LAST.graphs.append(graph_report)
    log.info("fxfuse graph %d: %s", graph_report.index, {m.pattern for m in graph_report.matches})
    shapes = _replaced_shapes(gm) if graph_report.matches else {}
    # The HOP bodies' links to the outer graph (set by `subgraphs`) served the rewrite; they would make
    # the graph cyclic for the compile caches' pickler (AOTAutograd's keys a regional piece by its graph).
    for _, sub in list(subgraphs(gm)):
        sub.meta.pop(OPERANDS_META, None)

    def name_failure(exc, part):
        return _graph_kernel_error(exc, graph_report, shapes, f"while Inductor compiled the {part} of")
    start = time.perf_counter()
    try:
        compiled = None
        name_failures = name_failure if graph_report.matches else None
        if options.get("regional", True) and graph_report.inner != "eager":
            graph_report.regional = RegionalSummary()
            compiled = compile_regions(gm, example_inputs, lambda piece, args: _inner_compile(
                piece, args, options, name_failures), fake_mode, graph_report.regional,
                offload=options.get("offload_layer_inputs", True) and not _cuda_graphs(options))
        if compiled is None:
            compiled = _inner_compile(gm, example_inputs, options, name_failures)
        graph_report.inner_compile_s = time.perf_counter() - start
    except BaseException as exc:
        # The graph is discarded: a failure, or Dynamo restarting its analysis (e.g. AOTAutograd
        # specialised a symbolic float such as eps under dynamic=True). Dynamo retraces and calls us
        # again, so this graph must not be counted.
        for rep in (report, _LAST):
            if rep is not None and graph_report in rep.graphs:
                rep.graphs.remove(graph_report)
        if graph_report.matches and isinstance(exc, Exception) and not isinstance(exc, KernelError) \
                and is_kernel_failure(exc):
            raise _graph_kernel_error(exc, graph_report, shapes, "while compiling") from exc
        raise
    if not graph_report.matches:
        return compiled
    return _guarded(compiled, gm.meta.get(OUTPUT_FIXUPS_META), graph_report, shapes)


def _register():
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "fxfuse" not in _BACKENDS:
        register_backend(name="fxfuse")(fxfuse_backend)


_register()
