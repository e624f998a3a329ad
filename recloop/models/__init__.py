"""PyTorch modules of the reference recommender (nn.Modules only; training lives in recloop.training)."""
