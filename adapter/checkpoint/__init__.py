"""Checkpoint formats and the conversions between them."""
