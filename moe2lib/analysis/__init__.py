"""Analyses of the artifacts: Fig. 3 and its baselines, Tables II-IV, and every figure."""
