"""llm-compressor quality rows for bench_fp4_quality: quantize SmolLM2, then score it in memory.

Runs inside bench/.venv-llmc and never imports quantkit. The model is scored in this process,
right after oneshot, because a QuIP checkpoint carries online transforms that the main venv's
transformers does not apply on load (docs/quality.md); every method is scored the same way.
Perplexity: fp32 compute (model.float() after quantization, as quantkit's side of the bench),
exp(mean next-token NLL) over the token windows given as .npy files.

    bench/.venv-llmc/bin/python bench/peers/run_llmc_quality.py --model DIR --scheme NVFP4A16 \
        --method gptq_mse --calib calib.npy --windows dev.npy heldout.npy --json r.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_llmcompressor import CALIB_BATCH_SIZE, calib_dataset, load_token_ids  # noqa: E402

# method -> (weight observer or None for the preset's, GPTQ, QuIP rotations)
METHODS = {
    "rtn": (None, False, False),
    "rtn_mse": ("memoryless_mse", False, False),
    "rtn_expanded_mse": ("nvfp4_expanded_mse", False, False),  # PR #2950's range-expanded MSE
    "gptq": (None, True, False),
    "gptq_mse": ("memoryless_mse", True, False),
    "quip_gptq": (None, True, True),
}
# QuIP block size: SmolLM2's 576 and 1536 are not powers of two; 64 divides both
QUIP_BLOCK = 64


def build_recipe(scheme: str, method: str) -> list:
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    observer, gptq, quip = METHODS[method]
    preset = copy.deepcopy(PRESET_SCHEMES[scheme])
    if observer is not None:
        preset["weights"] = preset["weights"].model_copy(update={"observer": observer})
    group = QuantizationScheme(targets=["Linear"], **preset)
    modifier = GPTQModifier if gptq else QuantizationModifier
    recipe = [modifier(config_groups={"group_0": group}, ignore=["lm_head"])]
    if quip:
        from llmcompressor.modifiers.transform import QuIPModifier

        recipe.insert(0, QuIPModifier(rotations=["v", "u"], transform_type="random-hadamard",
                                      transform_block_size=QUIP_BLOCK, ignore="lm_head"))
    return recipe


def window_ppl(model, windows, batch: int = 4) -> dict:
    """Perplexity and per-window mean NLL (for the spread across windows)."""
    import torch
    import torch.nn.functional as F

    per_window = []
    with torch.inference_mode():
        for i in range(0, windows.shape[0], batch):
            ids = windows[i : i + batch]
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # [b, s-1]
            per_window += nll.mean(1).tolist()
    return {"ppl": math.exp(sum(per_window) / len(per_window)), "window_nll": per_window}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--scheme", required=True, choices=("NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4"))
    p.add_argument("--method", required=True, choices=tuple(METHODS))
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--windows", type=Path, nargs="+", required=True, help="token windows .npy, scored in order")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot

    ids = load_token_ids(args.calib)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    row = {"peer": "llm-compressor", "scheme": args.scheme, "method": args.method, "quip_block": QUIP_BLOCK}
    t0 = time.perf_counter()
    try:
        oneshot(model=model, processor=tokenizer, recipe=build_recipe(args.scheme, args.method),
                dataset=calib_dataset(ids), num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
                batch_size=CALIB_BATCH_SIZE, shuffle_calibration_samples=False)
    except Exception as e:  # recorded, not hidden: the bench reports why a peer method did not run
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        args.json.write_text(json.dumps(row, indent=2) + "\n")
        raise
    row["calib_quant_s"] = time.perf_counter() - t0  # calibration + quantization (oneshot), no save
    model.float()
    t1 = time.perf_counter()
    row["evals"] = [window_ppl(model, torch.from_numpy(np.load(w)).long()) | {"windows": str(w)}
                    for w in args.windows]
    row["eval_s"] = time.perf_counter() - t1
    row["versions"] = {k: version(k) for k in ("llmcompressor", "compressed-tensors", "transformers", "torch")}
    row["threads"] = torch.get_num_threads()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
