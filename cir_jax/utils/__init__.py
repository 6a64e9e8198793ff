"""Small shared utilities: logging, progress, command-line flags."""
