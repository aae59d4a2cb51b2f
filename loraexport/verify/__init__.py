"""Verification: numerical parity and latency of an exported model."""
