"""Stage 4b: the embedding-grid prior, a diffusion model over k x k crops of the datasets' SSL
embedding grids (reference-free large images sample a grid from it, then render the grid)."""
