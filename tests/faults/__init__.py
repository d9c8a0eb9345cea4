"""The fault-injection suite: what survives what (see harness.py)."""
