"""The `builtin:` models and data the project builds itself, so tests and quick starts need no hub."""
