"""A stand-in for PyTorch in tests that need no tensors: only `torch.distributed.run`."""
