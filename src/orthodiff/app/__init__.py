"""The applications over the library: train, evaluate, generate, export, the demo, the memory
planner, the checks each runs before its first step (preflight) and key=value parsing (cli).
The repository's top-level scripts (train.py, eval.py, generate.py, ...) call into them;
nothing in the library imports them (tests/test_layering.py)."""
