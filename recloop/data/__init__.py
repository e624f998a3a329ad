"""Data: the canonical tables, the simulator and readers for users' own files."""
