"""Data sources, validation, fusion and the prepare stage."""
