"""kdray: knowledge distillation of large language models on Ray.

Importing the package is cheap on purpose (no torch, ray or transformers): the CLI, the config loader
and Ray job entry points start fast, and workers import the heavy parts only where they use them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
