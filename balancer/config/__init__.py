"""The configuration: a TOML file and command-line overrides, checked in full, turned into
frozen dataclasses. Pure but for resolve.py (names looked up at start). Imports no other layer."""
