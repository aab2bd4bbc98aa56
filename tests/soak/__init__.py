"""The crash-and-restart soak, short version (the long one is scripts/soak.py)."""
