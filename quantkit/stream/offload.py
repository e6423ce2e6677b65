"""--offload-dir: tensors that stay resident between blocks, kept in files and memory-mapped.

Streaming holds one decoder block, plus what lives across blocks: embeddings, final norm, head,
and the calibration hidden states the loop propagates. With an offload directory those go to
disk: each tensor is written to its own raw file and replaced by a tensor memory-mapped from it
(`torch.from_file`, a shared mapping of a file only this run uses). The kernel pages it in when a block reads it
and can drop those pages again under memory pressure, since they are clean and file-backed,
instead of failing the run. The values are bit-identical, so the checkpoint is too.

Why not accelerate's offload (`offload_state_dict` + `AlignDevicesHook`): it moves a module's
weights back to the execution device on every forward through hooks, which the block loop, which
calls blocks and the head itself, would have to install and remove around each call; a
memory-mapped tensor is simply used where it lies. safetensors' `safe_open` maps the file but
hands out copies, which would put the bytes back in RSS.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from quantkit.errors import QuantkitError


class OffloadStore:
    """A private directory under the user's offload dir; removed when the run ends (also on error)."""

    def __init__(self, root: str | Path):
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix="quantkit-offload-", dir=root))
        except OSError as e:
            raise QuantkitError(f"--offload-dir {root}: cannot create a directory there ({e.strerror})") from None
        self._n = 0
        # removed however the run ends: close(), the store collected after an error, or exit
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)

    def put(self, tensor: torch.Tensor, tag: str = "t") -> torch.Tensor:
        """Write tensor's bytes to a new file; -> a tensor of the same dtype/shape mapped from it."""
        if tensor.device.type != "cpu":
            return tensor  # offloading is for host memory; device tensors stay where they are
        src = tensor.detach().contiguous()
        self._n += 1
        path = self.dir / f"{self._n:06d}-{tag}.bin"
        # [numel * itemsize] bytes, native byte order: the layout from_file maps back
        data = src.reshape(-1).view(torch.uint8).numpy() if src.numel() else b""
        with open(path, "wb") as f:
            f.write(data)
        if src.numel() == 0:
            return src.clone()
        mapped = torch.from_file(str(path), shared=True, size=src.numel(), dtype=src.dtype)
        return mapped.view(src.shape)

    def drop(self, tensor: torch.Tensor) -> None:
        """Unlink the file behind a mapped tensor (the mapping stays valid while referenced)."""
        if is_offloaded(tensor, self):
            Path(tensor.untyped_storage().filename).unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return sorted(self.dir.iterdir()) if self.dir.exists() else []

    def close(self) -> None:
        """Remove the files; tensors still mapped from them stay valid (unlinked files live on while mapped)."""
        self._cleanup()

    def __enter__(self) -> OffloadStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_offloaded(tensor: torch.Tensor, store: OffloadStore) -> bool:
    """Whether tensor's storage is a file in store's directory."""
    name = getattr(tensor.untyped_storage(), "filename", None)
    return bool(name) and Path(name).parent == store.dir
