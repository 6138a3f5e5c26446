"""A plain PyTorch reference that shares no code with raygpt's trainer (see loop.py)."""
