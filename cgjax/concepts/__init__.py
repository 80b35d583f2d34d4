"""Gated concept tokens: selection of active concepts and the token block they add."""
