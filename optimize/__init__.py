"""Offline learning of samplers (Lightning + Hydra); builds on the `samplers` runtime."""
