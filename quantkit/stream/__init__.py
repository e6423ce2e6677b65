"""Streaming execution: lazy checkpoint tensors, block residency, block-input capture, the block loop."""
