"""The shopping guide: a finished run folder served to shoppers and operators (API and page)."""
