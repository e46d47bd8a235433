"""The benchmark: does the plan land on the oracle's cost-quality frontier? ``salf bench``, ``salf bench-table``."""
