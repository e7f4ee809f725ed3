"""Multi-scenario model blocks and backbones."""
