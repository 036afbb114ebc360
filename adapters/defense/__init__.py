"""Black-box defense: ZO-trained denoisers and randomized-smoothing certification."""
