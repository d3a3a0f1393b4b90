"""Framework adapters: the only code that imports torch, tensorflow or keras (lazily)."""
