"""Privacy stages and their accounting."""
