"""The benchmark: does the plan land on the oracle's cost-quality frontier? ``salf bench``, ``salf bench-table``."""

# Every baseline registers itself on import: the LLM tools' rules live in a module of their own.
from salf.bench import baselines_llm  # noqa: E402,F401
