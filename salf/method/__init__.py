"""The method: trace, gain, cost, plan, freeze. Imports only ``salf.data``, ``salf.models`` and the base modules."""
