"""Federated core: what a silo computes and sends, how the server combines it, and the simulator."""
