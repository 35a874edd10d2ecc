"""What fxfuse did to a model: patterns fired (where), places declined (why), share of nodes replaced.

The backend fills a `Report` for every graph it compiles; `explain(model, *args, **kwargs)` compiles
and runs one forward with a fresh report and returns it. `print(report)` gives the table.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import torch

from .matcher import Decline

__all__ = ["Report", "GraphReport", "MatchRecord", "explain"]


@dataclass
class MatchRecord:
    pattern: str
    where: str  # module path, e.g. layers.0.input_layernorm
    node: str
    nodes_replaced: int


@dataclass
class GraphReport:
    index: int
    total_nodes: int = 0
    matches: list = field(default_factory=list)
    declines: list = field(default_factory=list)
    disabled: list = field(default_factory=list)
    off_by_default: list = field(default_factory=list)
    post_passes: list = field(default_factory=list)  # what patterns' post passes changed, one line each
    inner: str = ""
    # Wall seconds of fxfuse's rewrite and of the inner compiler's compile (the forward graph; Inductor
    # compiles the backward later, at the first backward), to see where a first step's time goes.
    rewrite_s: float = 0.0
    inner_compile_s: float = 0.0
    regional: object = None  # fxfuse.regional.RegionalSummary: how the graph was cut for compiling, or why not

    @property
    def replaced_nodes(self) -> int:
        return sum(m.nodes_replaced for m in self.matches)


@dataclass
class Report:
    graphs: list = field(default_factory=list)

    def new_graph(self) -> GraphReport:
        g = GraphReport(index=len(self.graphs))
        self.graphs.append(g)
        return g

    @property
    def matches(self) -> list[MatchRecord]:
        return [m for g in self.graphs for m in g.matches]

    @property
    def declines(self) -> list[Decline]:
        return [d for g in self.graphs for d in g.declines]

    @property
    def post_passes(self) -> list[str]:
        return [line for g in self.graphs for line in g.post_passes]

    def counts(self) -> dict[str, int]:
        """Times each pattern fired, by pattern name."""
        return dict(Counter(m.pattern for m in self.matches))

    def where(self, pattern: str) -> list[str]:
        return [m.where for m in self.matches if m.pattern == pattern]

    @property
    def total_nodes(self) -> int:
        return sum(g.total_nodes for g in self.graphs)

    @property
    def replaced_nodes(self) -> int:
        return sum(g.replaced_nodes for g in self.graphs)

    @property
    def replaced_fraction(self) -> float:
        return self.replaced_nodes / self.total_nodes if self.total_nodes else 0.0

    def __str__(self) -> str:
        lines = [f"fxfuse: {len(self.graphs)} graph(s), {self.total_nodes} nodes, "
                 f"{self.replaced_nodes} replaced ({100 * self.replaced_fraction:.1f}%)"]
        counts = self.counts()
        if counts:
            lines.append("fired:")
            width = max(len(p) for p in counts)
            for p, n in counts.items():
                places = self.where(p)
                shown = ", ".join(places[:6]) + (f", ... ({len(places) - 6} more)" if len(places) > 6 else "")
                lines.append(f"  {p:<{width}}  x{n:<3} {shown}")
        else:
            lines.append("fired: nothing")
        if self.post_passes:
            lines.append("then:")
            lines.extend(f"  {line}" for line in self.post_passes)
        if self.declines:
            lines.append("declined:")
            for d in self.declines:
                lines.append(f"  {d.pattern} at {d.where} (node {d.node}): {d.reason}")
        disabled = sorted({p for g in self.graphs for p in g.disabled})
        if disabled:
            lines.append("disabled by options: " + ", ".join(disabled))
        off = sorted({p for g in self.graphs for p in g.off_by_default})
        if off:
            lines.append("off by default (options={'enable': [...]} turns on): " + ", ".join(off))
        if self.graphs:
            inner = sorted({g.inner for g in self.graphs})
            for g in self.graphs:
                if g.regional is not None:
                    lines.append(f"regional compilation, graph {g.index}: {g.regional}")
            lines.append(f"compile time: fxfuse's rewrite {sum(g.rewrite_s for g in self.graphs):.1f} s, then "
                         f"{'/'.join(inner)} {sum(g.inner_compile_s for g in self.graphs):.1f} s")
        return "\n".join(lines)

    __repr__ = __str__


def explain(model, *args, options: dict | None = None, **kwargs) -> Report:
    """Compile `model` with fxfuse, run one forward on `args`/`kwargs`, and report what happened.

    `model` is an nn.Module or a function (an already-compiled module is unwrapped). The forward
    runs as it would in training (grad mode as the caller has it); nothing is backpropagated.
    """
    from .backend import fxfuse_backend, validate_options
    if not callable(model):
        raise TypeError(f"explain() needs a module or function, got {type(model).__name__}")
    validate_options(options)
    model = getattr(model, "_orig_mod", model)
    report = Report()
    backend = functools.partial(fxfuse_backend, options=options, report=report)
    # A distinct backend object: Dynamo guards on it, so the user's own compiled entries are untouched.
    torch.compile(model, backend=backend)(*args, **kwargs)
    return report
