"""Multi-scenario recommenders enhanced by LLMs, on Ray."""
__version__ = "0.1.0"
