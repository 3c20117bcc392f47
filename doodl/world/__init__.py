"""The shapes world: a tiny procedural image world, the embedded models trained on it, and its judge."""
