"""Deterministic random-weight checkpoints of real models' shapes, written shard by shard.

Nothing is downloaded and nothing is committed: a benchmark calls `write_llama(shape, dir)` and
gets a bf16 safetensors checkpoint (plus SmolLM2's tokenizer, so calibration text tokenizes)
whose tensors are windows of one seeded pool of normal draws, at offsets drawn from the names. Peak memory is one
tensor, so a 7B-shaped model is written on a machine that could not hold it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from quantkit.export.shards import ShardWriter, finalize

# vocab is SmolLM2's 49152 everywhere, so its tokenizer's ids are valid (Llama-2's is 32000)
SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
    # the 7B's width at a quarter of its depth: streaming's peak RSS should not depend on depth
    "llama-7b-8l": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=8, num_attention_heads=32,
                        num_key_value_heads=32),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
}
VOCAB = 49152
STD = 0.02


POOL = (1 << 24) + 17  # one seeded pool of normal draws; tensors are name-offset windows of it


def _pool() -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(0)
    return (torch.randn(POOL, generator=g) * STD).to(torch.bfloat16)


def _tensor(pool: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A window of the pool starting at an offset drawn from the name (drawing 7B fresh normals would
    take an hour on two busy cores; a window copy runs at memory speed)."""
    n = 1
    for d in shape:
        n *= d
    start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % POOL
    reps = -(-(start + n) // POOL)
    flat = pool.repeat(reps)[start : start + n] if reps > 1 else pool[start : start + n]
    return flat.reshape(shape).clone()


def attention_tensors(prefix: str, hidden: int, kv: int) -> list[tuple[str, tuple[int, ...]]]:
    """One Llama-style block's norms and q/k/v/o projections (names and shapes) under `prefix`."""
    return [(prefix + "input_layernorm.weight", (hidden,)), (prefix + "post_attention_layernorm.weight", (hidden,)),
            (prefix + "self_attn.q_proj.weight", (hidden, hidden)), (prefix + "self_attn.k_proj.weight", (kv, hidden)),
            (prefix + "self_attn.v_proj.weight", (kv, hidden)), (prefix + "self_attn.o_proj.weight", (hidden, hidden))]


def write_synthetic(out: Path, config, blocks: list[tuple[str, tuple[int, ...]]], synthetic: dict,
                    max_shard_bytes: int = 2 * 1000**3) -> int:
    """Write a checkpoint: the embeddings, `blocks` (names and shapes), the final norm and the head,
    each a pool window (norms: ones), one tensor in memory at a time; then the config, SmolLM2's
    tokenizer and SYNTHETIC.json (`synthetic`, with `parameters` filled in when the key is given).
    -> the number of parameters written."""
    from transformers import AutoTokenizer

    from quantkit.models import default_model_dir

    out.mkdir(parents=True, exist_ok=True)
    hidden = config.hidden_size
    tensors = [("model.embed_tokens.weight", (VOCAB, hidden)), *blocks,
               ("model.norm.weight", (hidden,)), ("lm_head.weight", (VOCAB, hidden))]
    writer = ShardWriter(out, max_shard_bytes)
    pool = _pool()
    params = 0
    for name, shp in tensors:
        t = torch.ones(shp, dtype=torch.bfloat16) if name.endswith("norm.weight") else _tensor(pool, name, shp)
        params += t.numel()
        writer.add(name, t)
        del t
    shards = writer.close()
    finalize(out, shards, writer.total_bytes)
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(out)
    if "parameters" in synthetic:
        synthetic = {**synthetic, "parameters": params}
    (out / "SYNTHETIC.json").write_text(json.dumps(synthetic, indent=2) + "\n")
    return params


def write_llama(shape: str, out: Path, max_shard_bytes: int = 2 * 1000**3) -> Path:
    from transformers import LlamaConfig

    out = Path(out)
    if (out / "config.json").exists():
        return out
    dims = SHAPES[shape]
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
                         dtype="bfloat16", **dims)
    h, i, n = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = h // dims["num_attention_heads"] * dims["num_key_value_heads"]
    blocks: list[tuple[str, tuple[int, ...]]] = []
    for layer in range(n):
        p = f"model.layers.{layer}."
        blocks += attention_tensors(p, h, kv)
        blocks += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
    write_synthetic(out, config, blocks, {"shape": shape, "dims": dims, "vocab": VOCAB, "std": STD,
                                          "weights": "windows of one seeded normal pool at sha256(name) offsets"},
                    max_shard_bytes)
    return out
