"""Roles of a block's linears from its recorded dataflow, not from their names.

- Attention is where two linears' outputs meet in a token-mixing product: scaled_dot_product_attention
  (query, key, value are its first three arguments) or an eager q @ k^T followed by probs @ v.
  The linears feeding query/key/value get roles q/k/v (one linear feeding several: qkv, kv); the
  first linear reading the attention output is o.
- An MLP is a linear ("down") that reads only other MLP linears' outputs. Two feeders are gate
  (through the activation, the longer path) and up (straight into the product); one feeder is
  up, or gate_up when it writes twice the width down reads (a packed GLU).
- Routers (MoE) are the modules beside the experts whose weight has one row per expert (or one
  row: a shared-expert gate); they stay out of every role. MLP linears beside experts are the
  shared expert: roles shared_gate/shared_up/shared_down.
- Fused groups are linears of one kind that read the very same input tensor.
Linears none of this explains keep their path as role, so they are still quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.structure.experts import ExpertsInfo
from quantkit.structure.trace import Trace

ROLE_ORDER = ("q", "k", "v", "qk", "kv", "qkv", "o", "gate", "up", "gate_up", "down",
              "shared_gate", "shared_up", "shared_gate_up", "shared_down")
_MIXING = {"matmul", "__matmul__", "__rmatmul__", "bmm", "einsum", "baddbmm"}
_SDPA = "scaled_dot_product_attention"


@dataclass(frozen=True)
class LinearInfo:
    path: str  # relative to the block
    role: str
    kind: str  # attention | mlp | other


@dataclass(frozen=True)
class BlockStructure:
    linears: tuple[LinearInfo, ...]  # in ROLE_ORDER, then the unexplained ones in call order
    fused: tuple[tuple[str, ...], ...]  # roles of linears reading one input tensor
    attn_path: str
    experts: tuple[ExpertsInfo, ...] = ()
    routers: tuple[str, ...] = ()  # paths relative to the block
    heads: tuple[int, int, int] | None = None  # (query heads, kv heads, head dim) seen in the trace

    @property
    def roles(self) -> dict[str, str]:
        return {li.role: li.path for li in self.linears}


def _walk(tid: int, hits: dict[int, list[str]], step) -> tuple[set[int], list[str]]:
    """(tensors reached, linears met in order) from tid, depth first through step(tensor) -> the
    next tensors, stopping at a tensor in `hits` (a linear's output or input) and taking its linears."""
    seen: set[int] = set()
    found: list[str] = []
    stack = [tid]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in hits:
            found += [p for p in hits[t] if p not in found]
            continue
        stack.extend(step(t))
    return seen, found


def _back(trace: Trace, tid: int, stops: dict[int, list[str]]) -> tuple[set[int], set[str]]:
    """(ancestor tensor ids, nearest linears) of a tensor, not walking through a linear's output."""
    seen, found = _walk(tid, stops, lambda t: [i for op in trace.producers.get(t, ()) for i in trace.ops[op].inputs])
    return seen, set(found)


def _forward_linears(trace: Trace, tid: int, readers: dict[int, list[str]]) -> list[str]:
    """Nearest linears reading a tensor or anything computed from it."""
    return _walk(tid, readers, lambda t: [o for op in trace.consumers.get(t, ()) for o in trace.ops[op].outputs])[1]


def _distance(trace: Trace, src: int, dst: int) -> int:
    """Ops between two tensors (breadth-first), a large number if dst is not reached."""
    frontier, seen, steps = [src], {src}, 0
    while frontier and steps < 64:
        if dst in frontier:
            return steps
        nxt = []
        for t in frontier:
            for op in trace.consumers.get(t, ()):
                nxt += [o for o in trace.ops[op].outputs if o not in seen]
                seen.update(trace.ops[op].outputs)
        frontier, steps = nxt, steps + 1
    return 1 << 30


def _attention_site(trace: Trace, stops: dict[int, list[str]]):
    """(q, k, v linear sets, attention output tensor id) of the first attention in the block."""
    first = None
    for op in trace.ops:
        if op.name == _SDPA and len(op.inputs) >= 3:
            q, k, v = (_back(trace, t, stops)[1] for t in op.inputs[:3])
            if q and k and v:
                return q, k, v, op.outputs[0], op.inputs[0]
        if op.name in _MIXING:
            data = [(t, _back(trace, t, stops)) for t in op.inputs]
            data = [(t, seen, lin) for t, (seen, lin) in data if lin]
            if len(data) < 2:
                continue
            if first is None:
                first = (op, data)
                continue
            # probs @ v: one operand descends from the scores product, the other is v
            scores_out = first[0].outputs[0]
            from_scores = [d for d in data if scores_out in d[1]]
            others = [d for d in data if scores_out not in d[1]]
            if from_scores and others:
                q, k = first[1][0][2], first[1][1][2]
                return q, k, others[0][2], op.outputs[0], first[1][0][0]
    return None


def _qkv_roles(q: set[str], k: set[str], v: set[str]) -> dict[str, str]:
    roles = {}
    for path in sorted(q | k | v):
        roles[path] = "".join(letter for letter, s in (("q", q), ("k", k), ("v", v)) if path in s)
    return roles


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in paths]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def find_routers(block: nn.Module, experts: list[ExpertsInfo]) -> list[str]:
    """Modules beside the experts whose 2-D weight has one row per expert, or a single row."""
    routers = []
    for info in experts:
        parent = info.path.rpartition(".")[0]
        scope = block.get_submodule(parent) if parent else block
        for name, mod in scope.named_modules():
            path = f"{parent}.{name}" if parent and name else (name or parent)
            if _under(path, info.path):
                continue
            w = getattr(mod, "weight", None)
            if w is not None and w.dim() == 2 and w.shape[0] in (1, info.num_experts) and path not in routers:
                routers.append(path)
    return routers


def assign_roles(trace: Trace, linears: dict[str, nn.Module], experts: list[ExpertsInfo],
                 routers: list[str]) -> BlockStructure:
    stops = {tid: [path] for path, tid in trace.linear_out.items()}  # a linear's output: the walk back ends there
    readers: dict[int, list[str]] = {}
    for path, tid in trace.linear_in.items():
        readers.setdefault(tid, []).append(path)
    called = [p for p in trace.call_order if p in linears and p not in routers]

    role: dict[str, str] = {}
    kind: dict[str, str] = {}
    site = _attention_site(trace, stops)
    heads = None
    if site is not None:
        q, k, v, out, query = site
        heads = _heads(trace, query, q, k, v)
        for path, r in _qkv_roles(q, k, v).items():
            role[path], kind[path] = r, "attention"
        for path in _forward_linears(trace, out, readers):
            role[path], kind[path] = "o", "attention"
            break

    moe_scopes = [e.path.rpartition(".")[0] for e in experts]
    mlp = [p for p in called if p not in role]
    feeders_of = {p: _back(trace, trace.linear_in[p], stops)[1] for p in mlp}
    downs = [p for p in mlp if feeders_of[p] and feeders_of[p] <= set(mlp)]
    dense_done = False
    for down in downs:
        shared = any(_under(down, s) for s in moe_scopes)
        if not shared and dense_done:
            continue  # a second dense MLP in one block: its linears keep their paths
        prefix = "shared_" if shared else ""
        feeders = sorted(feeders_of[down], key=called.index)
        named: dict[str, str] = {}
        if len(feeders) == 2:
            near = {f: _distance(trace, trace.linear_out[f], trace.linear_in[down]) for f in feeders}
            up, gate = sorted(feeders, key=lambda f: near[f])
            named = {gate: "gate", up: "up"}
        elif len(feeders) == 1:
            width = trace.shapes[trace.linear_out[feeders[0]]][-1]
            named = {feeders[0]: "gate_up" if width == 2 * trace.shapes[trace.linear_in[down]][-1] else "up"}
        if not named or any(f in role for f in named):
            continue
        named[down] = "down"
        for path, r in named.items():
            role[path], kind[path] = prefix + r, "mlp"
        dense_done = dense_done or not shared

    infos = [LinearInfo(p, role[p], kind[p]) for p in role]
    infos.sort(key=lambda li: ROLE_ORDER.index(li.role))
    taken = {li.path for li in infos}
    infos += [LinearInfo(p, p, "other") for p in linears if p not in taken and p not in routers]

    groups: dict[int, list[str]] = {}
    for li in infos:
        if li.kind in ("attention", "mlp") and li.path in trace.linear_in:
            groups.setdefault((trace.linear_in[li.path], li.kind), []).append(li.role)
    fused = tuple(tuple(g) for g in groups.values() if len(g) > 1)
    attn = [li.path for li in infos if li.kind == "attention"]
    return BlockStructure(
        linears=tuple(infos),
        fused=fused,
        attn_path=_common_prefix(attn) if attn else "",
        experts=tuple(experts),
        routers=tuple(routers),
        heads=heads,
    )


def _heads(trace: Trace, query: int, q: set[str], k: set[str], v: set[str]) -> tuple[int, int, int] | None:
    """Query heads and head dim from the query tensor [B, H, T, d]; kv heads from the key's linear."""
    shape = trace.shapes.get(query, ())
    if len(shape) != 4 or len(k) != 1:
        return None
    n_heads, head_dim = shape[1], shape[3]
    (key,) = k
    width = trace.shapes[trace.linear_out[key]][-1]
    shares = (key in q) + 1 + (key in v)  # slices of the key linear's output: q? k, v?
    rest = width // head_dim - (n_heads if key in q else 0)
    n_kv = rest // (shares - (key in q))
    if width % head_dim or n_kv <= 0 or n_heads % n_kv:  # e.g. MLA's kv_b_proj: not heads x head_dim
        return None  # the caller asks the config
    return n_heads, n_kv, head_dim
