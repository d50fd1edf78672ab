"""sessionpool's composition layer: the console script, `up`, pool files and key commands.

It sits above `router/` (the edge and the session-state contract) and `workers/` (background
work); nothing imports it (tests/test_layers.py checks that).
"""
