"""Atomic file output and WebDataset shard writing shared by every stage."""
