"""Per-expert checkpoint tensors: quantkit's (export/ct_experts.py) vs llm-compressor's, same tiny MoE.

For each tiny MoE (tests/tiny_models.py: Mixtral, Qwen2-MoE, 4 experts, bf16, SmolLM2's
tokenizer) and each weight-only scheme both tools write per expert, llm-compressor quantizes the
saved model in its own environment (bench/peers) and quantkit quantizes the same weights with
quantize_experts; the per-expert tensors are compared name by name (each tool's naming), byte
for byte. Writes bench/results/moe_experts.json and .md.

    .venv/bin/python -m bench.bench_moe_experts
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers.common import ensure_peer, peer_versions, run_peer, write_calib  # noqa: E402
from bench.provenance import provenance, provenance_markdown  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCHEMES = {"NVFP4A16": "nvfp4", "MXFP4A16": "mxfp4"}  # llm-compressor preset -> quantkit format
ARCHS = ("mixtral", "qwen2_moe")
# quantkit writes what the original checkpoints use; llm-compressor writes its linearized names
PEER_NAME = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _save_tiny(arch: str, out: Path) -> None:
    from transformers import AutoTokenizer

    from quantkit.models import default_model_dir
    from tests.tiny_models import tiny_model

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    tiny_model(arch, vocab_size=len(tok), dtype=torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _compare(arch: str, fmt: str, model_dir: Path, peer_dir: Path) -> dict:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from quantkit.arch import arch_info
    from quantkit.export.ct_experts import expert_tensors
    from quantkit.nn.qexperts import quantize_experts

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    info = arch_info(model)
    peer = safe_open(str(peer_dir / "model.safetensors"), "pt")
    peer_keys = set(peer.keys())
    equal = total = ours_bytes = peer_bytes = 0
    experts = 0
    example = None
    for layer in range(info.num_layers):
        for name, layout in info.experts(layer):
            experts += layout.num_experts
            q = quantize_experts(model.get_submodule(name), fmt, "real")
            for key, ours in expert_tensors(name, q, info.model_type).items():
                parts = key.split(".")
                parts[-2] = PEER_NAME.get(parts[-2], parts[-2])
                peer_key = ".".join(parts)
                example = example or (key, peer_key)
                total += 1
                ours_bytes += ours.numel() * ours.element_size()
                if peer_key not in peer_keys:
                    continue
                theirs = peer.get_tensor(peer_key)
                peer_bytes += theirs.numel() * theirs.element_size()
                equal += int(ours.shape == theirs.shape and torch.equal(_as_bytes(ours), _as_bytes(theirs)))
    return {"arch": arch, "format": fmt, "experts": experts, "tensors": total, "bitwise_equal": equal,
            "quantkit_bytes_per_expert": ours_bytes / experts, "peer_bytes_per_expert": peer_bytes / experts,
            "quantkit_name": example[0], "peer_name": example[1]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    prov = provenance("bench/bench_moe_experts.py", argv or [])
    ensure_peer()
    work = Path(args.work or tempfile.mkdtemp(prefix="moe-experts-"))
    calib = write_calib(torch.randint(0, 4000, (4, 64), generator=torch.Generator().manual_seed(0)), work / "calib.npy")
    rows = []
    for arch in ARCHS:
        model_dir = work / arch
        _save_tiny(arch, model_dir)
        for scheme, fmt in SCHEMES.items():
            peer_dir = work / f"llmc-{arch}-{scheme}"
            run_peer(scheme, model_dir, calib, peer_dir, overwrite=True, log_file=work / f"{peer_dir.name}.log")
            rows.append({"scheme": scheme, **_compare(arch, fmt, model_dir, peer_dir)})
            print(json.dumps(rows[-1]), flush=True)
    out = {"provenance": prov, "peer": peer_versions(), "rows": rows, "loadavg_end": os.getloadavg()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "moe_experts.json").write_text(json.dumps(out, indent=2))
    lines = ["# MoE experts: per-expert checkpoint tensors, quantkit vs llm-compressor", "",
             *provenance_markdown(prov, out["loadavg_end"]),
             "Peer: " + ", ".join(f"{k} {v}" for k, v in out["peer"].items()) + ".", "",
             "| model | scheme | experts | tensors bitwise equal | bytes/expert quantkit | bytes/expert llm-compressor | quantkit name | llm-compressor name |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['scheme']} | {r['experts']} | {r['bitwise_equal']}/{r['tensors']} | "
              f"{r['quantkit_bytes_per_expert']:.0f} | {r['peer_bytes_per_expert']:.0f} | `{r['quantkit_name']}` | "
              f"`{r['peer_name']}` |" for r in rows]
    (RESULTS / "moe_experts.md").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
