"""Infrastructure every layer may use: atomic artifact files with provenance, and worker processes."""
