"""Small helpers: atomic file writes, third-party compatibility."""
