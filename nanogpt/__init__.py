"""nanogpt: train, finetune and sample GPT models, from a laptop CPU to a GPU cluster."""

__version__ = "0.1.0"
