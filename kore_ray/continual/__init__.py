"""Continual injection: knowledge in batches, versions that protect the earlier ones."""
