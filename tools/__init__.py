"""Command-line programs over the xcos_tf library (run from the repo root: python -m tools.NAME)."""
