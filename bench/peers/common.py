"""Run the llm-compressor peer from quantkit's side of a benchmark.

Plain Python on purpose (no torch, no quantkit): the peer lives in its own virtual environment
(bench/.venv-llmc, made by setup_llmcompressor.sh) and is driven through a subprocess, so this
module only deals in paths, JSON and process measurements.

    from bench.peers.common import ensure_peer, write_calib, run_peer
    ensure_peer()
    write_calib(ids, "bench/work/calib.npy")          # ids: LongTensor [N, seq] from load_calib
    peer = run_peer("NVFP4", model_dir, "bench/work/calib.npy", "bench/work/llmc-NVFP4")
    peer["time_apply_s"], peer["outside"]["peak_rss_mb"], peer["checkpoint_bytes"]
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent
BENCH_DIR = PEERS_DIR.parent
VENV_DIR = Path(os.environ.get("LLMC_VENV", BENCH_DIR / ".venv-llmc"))
RUNNER = PEERS_DIR / "run_llmcompressor.py"
SETUP = PEERS_DIR / "setup_llmcompressor.sh"
MARKER = ".quantkit-llmc-ready"  # written by setup_llmcompressor.sh once the install succeeded
GNU_TIME = Path("/usr/bin/time")  # GNU time -v reports the child's peak RSS exactly
LOG_TAIL_CHARS = 3000  # how much of a failed peer's output goes into the exception


class PeerError(RuntimeError):
    """The peer could not be installed or its run failed."""


def peer_python() -> Path:
    return VENV_DIR / "bin" / "python"


def peer_available() -> bool:
    return (VENV_DIR / MARKER).exists() and peer_python().exists()


def peer_versions() -> dict[str, str]:
    """{package: version} recorded at install time, {} when the peer is not installed."""
    marker = VENV_DIR / MARKER
    if not marker.exists():
        return {}
    pairs = (line.split("==", 1) for line in marker.read_text().splitlines() if "==" in line)
    return {name: ver for name, ver in pairs}


def ensure_peer(timeout: float | None = 1800) -> float:
    """Install the peer venv if missing -> seconds spent (0.0 when it was already there)."""
    if peer_available():
        return 0.0
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not peer_available():
        raise PeerError(f"installing llm-compressor failed:\n{(proc.stdout + proc.stderr)[-LOG_TAIL_CHARS:]}")
    return time.perf_counter() - start


def write_calib(token_ids, path: str | os.PathLike) -> Path:
    """Token ids [N, seq] (torch tensor, numpy array or nested lists) -> .npy or .json for the peer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = token_ids.tolist() if hasattr(token_ids, "tolist") else [list(r) for r in token_ids]
    if path.suffix == ".npy":
        import numpy as np

        np.save(path, np.asarray(rows, dtype=np.int64))
    elif path.suffix == ".json":
        path.write_text(json.dumps({"input_ids": rows}))
    else:
        raise ValueError(f"{path}: write the calibration ids as .npy or .json")
    return path


def parse_gnu_time(text: str) -> dict:
    """What GNU time -v reports: peak_rss_mb, cpu_s (user + system), wall_s, exit_status, signal
    (the one that killed the command) and command; keys only for what the report holds."""
    found = {k: re.search(p, text, re.S) for k, p in (
        ("rss", r"Maximum resident set size \(kbytes\): (\d+)"), ("user", r"User time \(seconds\): ([\d.]+)"),
        ("system", r"System time \(seconds\): ([\d.]+)"),
        ("wall", r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)"),
        ("exit", r"Exit status: (\d+)"), ("signal", r"Command terminated by signal (\d+)"),
        ("command", r'Command being timed: "(.*?)"\n'))}
    out: dict = {}
    if found["rss"]:
        out["peak_rss_mb"] = int(found["rss"].group(1)) / 1024
    if found["user"] and found["system"]:
        out["cpu_s"] = float(found["user"].group(1)) + float(found["system"].group(1))
    if found["wall"]:
        wall = 0.0
        for part in found["wall"].group(1).split(":"):  # h:mm:ss or m:ss.ss
            wall = wall * 60 + float(part)
        out["wall_s"] = wall
    if found["exit"]:
        out["exit_status"] = int(found["exit"].group(1))
    if found["signal"]:
        out["signal"] = int(found["signal"].group(1))
    if found["command"]:
        out["command"] = found["command"].group(1)
    return out


def peer_env() -> dict[str, str]:
    """The peer must not see quantkit's environment (its venv, PYTHONPATH) or it may import the
    wrong transformers; tokenizers' fork warning is noise here."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def peer_command(scheme: str, model_dir: str | os.PathLike, calib_file: str | os.PathLike, out_dir: str | os.PathLike,
                 json_file: str | os.PathLike, *, gptq: bool = False, threads: int = 0,
                 overwrite: bool = False) -> list[str]:
    """The peer runner's command line (a caller may wrap it in its own measurement); clears
    out_dir when overwrite, and the previous JSON."""
    out_dir = Path(out_dir)
    if out_dir.exists() and overwrite:
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    Path(json_file).unlink(missing_ok=True)
    cmd = [str(peer_python()), str(RUNNER), "--model", str(model_dir), "--scheme", scheme,
           "--calib", str(calib_file), "--out", str(out_dir), "--json", str(json_file)]
    if gptq:
        cmd.append("--gptq")
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def run_peer(
    scheme: str,
    model_dir: str | os.PathLike,
    calib_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    gptq: bool = False,
    threads: int = 0,
    overwrite: bool = False,
    timeout: float | None = 3600,
    log_file: str | os.PathLike | None = None,
) -> dict:
    """Quantize model_dir with llm-compressor -> the peer's JSON plus an "outside" measurement.

    "outside" is what this process saw: wall_s (interpreter start to exit, imports included)
    and peak_rss_mb of the child (GNU time when present, else getrusage(RUSAGE_CHILDREN), which
    is the maximum over all children waited for so far: exact only for the first one).
    """
    if not peer_available():
        raise PeerError(f"llm-compressor is not installed in {VENV_DIR}; run bash {SETUP}")
    out_dir = Path(out_dir)
    json_file = out_dir.parent / f"{out_dir.name}.peer.json"
    cmd = peer_command(scheme, model_dir, calib_file, out_dir, json_file, gptq=gptq, threads=threads,
                       overwrite=overwrite)
    time_file = out_dir.parent / f"{out_dir.name}.time.txt"
    if GNU_TIME.exists():
        cmd = [str(GNU_TIME), "-v", "-o", str(time_file), *cmd]

    start = time.perf_counter()
    # Its own process group, so a timeout kills the peer itself, not only /usr/bin/time above it
    # (whose orphaned child would keep running and holding the output pipes).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=peer_env(),
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    wall = time.perf_counter() - start
    if log_file:
        Path(log_file).write_text(log)
    if proc.returncode != 0 or not json_file.exists():
        raise PeerError(f"llm-compressor {scheme} failed (exit {proc.returncode}):\n{log[-LOG_TAIL_CHARS:]}")

    result = json.loads(json_file.read_text())
    outside = {"wall_s": wall}
    if time_file.exists():
        outside |= {k: v for k, v in parse_gnu_time(time_file.read_text()).items() if k in ("peak_rss_mb", "cpu_s")}
        outside["how"] = "gnu-time"
    else:
        outside["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        outside["how"] = "getrusage-children"
    result["outside"] = outside
    return result
