"""Training on Ray Train (DDP)."""
