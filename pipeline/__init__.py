"""Library for sharding, streaming, fine-tuning and evaluating ResNet-18 on Ray.

Each module is one concern; ``jobs/`` holds the thin entry points that call them.
"""

__version__ = "0.1.0"
