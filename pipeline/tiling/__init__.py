"""Stage 1: cut slides and aerial images into fixed-size patches at a physical resolution."""
