"""salf: semantic-aware layer freezing. Decide where to fine-tune, freeze the rest, measure the saving."""

__version__ = "0.1.0"
