"""models (filled in by later issues)."""
