"""Real deployment on Flower's deployment engine: one process per party, TLS, node authentication."""
