"""Show: figures (matplotlib) and the self-contained HTML report."""
