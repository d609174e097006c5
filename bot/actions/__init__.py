"""Button handlers, one module per feature."""
