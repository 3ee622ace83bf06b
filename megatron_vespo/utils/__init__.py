"""Small shared helpers (guarded imports, atomic file writes)."""
