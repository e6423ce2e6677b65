"""Block-diagonal Hadamard rotations (math in hadamard.py). The `rotate` pass is not built yet."""
