"""kore-ray: inject new knowledge into (multimodal) LLMs without forgetting, on Ray (KORE)."""

__version__ = "0.1.0"
