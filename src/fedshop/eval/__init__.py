"""Evaluation metrics: top-K ranking under the full and sampled-100 protocols, per silo and overall."""
