"""Explanation methods beside xCos: the exact decomposition of a linear-tail model's cosine and a Grad-CAM baseline."""
