"""The benchmark: does the plan land on the oracle's cost-quality frontier? ``salf bench``, ``salf bench-table``."""

# Every baseline registers itself on import: beyond the depth-only policies of salf.bench.baselines, each kind
# lives in a module of its own (the registry lists them sorted by name, whatever the order of import).
from salf.bench import (  # noqa: F401
    baselines_gradient,
    baselines_llm,
    baselines_representation,
    baselines_variants,
)
