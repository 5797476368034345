"""Small shared helpers: atomic file writes, path discovery."""
