"""Stage 2: SSL patch embeddings (encoder registry, checkpoint conversion, extraction)."""
