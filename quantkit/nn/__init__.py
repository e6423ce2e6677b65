"""Runtime modules for real (packed) quantization."""

from quantkit.nn.qlinear import QLinear

__all__ = ["QLinear"]
