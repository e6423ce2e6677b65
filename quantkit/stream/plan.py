"""Decisions taken before any weight loads: execution mode, where the shards are, stages."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from quantkit.errors import ModelLoadError, RecipeError

EXECUTIONS = ("auto", "whole", "streaming")
# auto streams when the checkpoint would take more than this share of the available memory
AUTO_STREAM_SHARE = 0.4


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# facts of passes that only observe the model (they leave every weight as it is)
OBSERVING_FACTS = frozenset({"calib", "act_stats", "expert_stats"})


def changes_weights(p) -> bool:
    return not p.provided_facts() <= OBSERVING_FACTS


def sweeps_first(p) -> bool:
    """A block pass that needs every block's statistics before it changes any (MASA): two sweeps."""
    return hasattr(p, "observe_block")


def stages(passes) -> list[list]:
    """Consecutive block passes share one block loop; a whole-model pass is a stage of its own.

    A two-sweep pass (MASA) joins the loop before it only if the passes there leave the weights
    as they are: its first sweep runs them too, and a streaming run cannot keep their changes
    between the sweeps (the released blocks are read again from the source).
    """
    out: list[list] = []
    for p in passes:
        joins = p.execution == "block" and out and out[-1][0].execution == "block"
        if joins and sweeps_first(p) and any(changes_weights(q) or sweeps_first(q) for q in out[-1]):
            joins = False
        if joins:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def model_passes(passes) -> list:
    return [p for p in passes if p.execution != "block"]


def check_streamable(passes, where: str = "recipe") -> None:
    whole_only = model_passes(passes)
    if whole_only:
        raise RecipeError(
            f"{where}: pass {whole_only[0].name!r} needs the whole model in memory; it cannot run with "
            "execution: streaming (use --execution whole)"
        )
    split = stages(passes)
    if len(split) > 1:
        first = split[1][0]
        raise RecipeError(
            f"{where}: pass {first.name!r} needs every block's statistics before it changes any, and a pass "
            f"before it ({split[0][-1].name!r}) changes weights; streaming cannot keep those changes between "
            "its two sweeps (put it first, or use --execution whole)"
        )


def with_offload(requested: str, mode: str, why: str, passes, model_dir: Path | None) -> tuple[str, str]:
    """--offload-dir moves what streaming keeps between blocks to disk: it implies streaming."""
    if mode == "streaming":
        return mode, why
    if requested == "whole" or model_dir is None:
        raise RecipeError("--offload-dir offloads what streaming keeps between blocks; it needs execution: "
                          "streaming and a safetensors checkpoint on disk (not execution: whole)")
    check_streamable(passes)
    return "streaming", "--offload-dir given"


def gguf_shards_dir(path: Path) -> Path:
    """A GGUF file converted once to a safetensors checkpoint in the cache (keyed by path, size, mtime)."""
    from quantkit.models import gguf_as_dir
    from quantkit.paths import cache_dir

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    return gguf_as_dir(path, target, f".{key}.lock")


def local_model_dir(spec: str) -> Path:
    """The directory of safetensors shards behind a model spec (alias, dir, .gguf, hub id in the cache)."""
    from quantkit.models import resolve_model_path

    target = resolve_model_path(spec)
    if target.endswith(".gguf"):
        return gguf_shards_dir(Path(target))
    if Path(target).exists():
        return Path(target)
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        return Path(snapshot_download(target, local_files_only=offline,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001  (hub errors come in many types; one line for the user)
        raise ModelLoadError(
            f"model {spec!r} is not in the local Hugging Face cache and could not be downloaded "
            f"(offline?); download it first with `hf download {spec}` or pass a local directory"
        ) from e


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def choose_execution(requested: str, passes, model_dir: Path | None) -> tuple[str, str]:
    """-> (execution, why)."""
    if requested not in EXECUTIONS:
        raise RecipeError(f"execution must be one of {', '.join(EXECUTIONS)} (got {requested!r})")
    if requested == "streaming":
        check_streamable(passes)
        return "streaming", "requested"
    if requested == "whole":
        return "whole", "requested"
    if model_passes(passes):
        return "whole", f"pass {model_passes(passes)[0].name!r} needs the whole model"
    planned = stages(passes)
    if len(planned) > 1:
        return "whole", f"pass {planned[1][0].name!r} needs two sweeps after a pass that changes weights"
    if model_dir is None:
        return "whole", "no safetensors checkpoint to stream from"
    size, avail = checkpoint_bytes(model_dir), available_memory()
    if size > AUTO_STREAM_SHARE * avail:
        return "streaming", f"checkpoint {size / 1e9:.1f} GB > {AUTO_STREAM_SHARE:.0%} of {avail / 1e9:.1f} GB available"
    return "whole", f"checkpoint {size / 1e9:.2f} GB fits in {avail / 1e9:.1f} GB available"
