"""Adapters to tools people already use: optimum-cli, lm-evaluation-harness."""
