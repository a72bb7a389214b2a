"""Privacy attacks on what a federation releases (membership, item inference): they may train."""
