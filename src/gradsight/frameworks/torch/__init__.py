"""The PyTorch adapter.

Capture (hooks) and kernels, DDP, explain, the zoo's networks, Lightning and Hugging Face callbacks. Importing
this package imports nothing; its modules import torch.
"""
