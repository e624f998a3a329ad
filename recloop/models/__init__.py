"""PyTorch modules of the two-tower retrieval model (nn.Modules only; training lives in recloop.training)."""
