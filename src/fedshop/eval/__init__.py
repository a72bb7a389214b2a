"""Evaluation: full-ranking metrics, overall and per silo, and the non-learned baselines."""
