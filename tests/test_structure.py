"""Discovery cross-checked against transformers' own tensor-parallel plan, where a model has one."""

import pytest

from quantkit.arch import arch_info
from tests.tiny_models import TINY_CONFIGS, tiny_model

# colwise shards output rows (q/k/v, gate/up: inputs of a product), rowwise shards input columns (o/down)
COLWISE = {"q", "k", "v", "qkv", "kv", "gate", "up", "gate_up", "shared_gate", "shared_up", "shared_gate_up"}
ROWWISE = {"o", "down", "shared_down"}


def _plan(model):
    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    return {k.split("layers.*.", 1)[1]: v for k, v in plan.items() if k.startswith("layers.*.")}


WITH_PLAN = [a for a in sorted(TINY_CONFIGS) if _plan(tiny_model(a))]


def test_most_tiny_architectures_have_a_plan_to_check_against():
    assert len(WITH_PLAN) >= 10, WITH_PLAN


@pytest.mark.parametrize("arch", WITH_PLAN)
def test_roles_agree_with_the_tp_plan(arch):
    model = tiny_model(arch)
    info = arch_info(model)
    roles = {path: role for role, path in info.roles.items()}
    experts = {e.path for b in info.blocks for e in b.experts}
    block = info.layers(model)[0]
    present = {name for name, _ in block.named_modules()} | {n for n, _ in block.named_parameters()}
    checked = 0
    for path, style in _plan(model).items():
        if path not in present:
            continue  # e.g. Qwen2-MoE's dense-MLP entries, for layers this tiny model does not have
        if path in roles:
            want = COLWISE if style.startswith(("colwise", "packed_colwise")) else ROWWISE
            assert roles[path] in want, (path, style, roles[path])
            checked += 1
        elif path.rpartition(".")[0] in experts or path in experts:
            continue  # fused experts: described by ExpertsInfo, not by a linear role
        else:
            pytest.fail(f"{arch}: the tp plan names {path} ({style}) but discovery gave it no role")
    assert checked >= 2
