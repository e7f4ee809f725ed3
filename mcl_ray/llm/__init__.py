"""LLM stages: the text encoder (semantic features)."""
