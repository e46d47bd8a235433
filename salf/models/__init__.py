"""The models: where each architecture keeps its parts, loading, built-in and tiny models, head pooling."""
