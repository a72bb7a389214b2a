"""Persistent state: the privacy-budget ledger (SQLite by default, any SQL URL)."""
