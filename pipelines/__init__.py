"""recloop's Dagster code location: `definitions.py` loads one defs module per lifecycle stage."""
