"""`make bench`: every benchmark in one run; each writes bench/results/<name>.json and .md.

A failing benchmark is reported and the others still run; the exit code is 1 if any failed.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCHES = ["bench_apply", "bench_formats", "bench_fp4_quality", "bench_llm_int8", "bench_quantvla",
           "bench_masa", "bench_sensitivity", "bench_streaming", "bench_runtime", "bench_rotate",
           "bench_moe_experts", "bench_moe"]


def main() -> int:
    only = sys.argv[1:] or BENCHES
    failed = []
    for name in only:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            importlib.import_module(f"bench.{name}").main([])
        except Exception:  # keep going: one broken bench must not hide the others
            traceback.print_exc()
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
