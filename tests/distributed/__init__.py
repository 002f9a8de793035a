"""Helpers that launch tests in several processes (torchrun, accelerate launch)."""
