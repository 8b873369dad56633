"""mnist_edge: the MNIST CNN, its shard reader and its Scaleout Edge callbacks."""

__version__ = "0.1.0"
