"""Data layer: loading, cleaning, partitioning into silos and splitting into train/test."""
