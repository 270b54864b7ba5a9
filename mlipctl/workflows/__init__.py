"""Workflows chain commands (generate → label → fit → validate); they sit above the engines."""
