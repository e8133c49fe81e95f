"""Examples for bringing your own model (docs/byo-model.md)."""
