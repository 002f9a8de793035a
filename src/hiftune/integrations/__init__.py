"""Integrations: HiFT inside the Hugging Face ``Trainer`` and TRL, through their extension points."""
