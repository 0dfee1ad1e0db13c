"""Streaming: online model updates (and, later, the Structured Streaming job)."""
