"""recloop: a closed-loop MLOps platform for recommender systems."""

__version__ = "0.1.0"
