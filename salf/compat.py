"""What differs between the library versions salf supports, in one place.

``scripts/version_matrix.sh`` tests the lowest versions pyproject.toml allows and the newest releases. Where an
API was renamed between versions salf may meet, salf asks here instead of assuming one version:

- the weights' dtype keyword of ``from_pretrained`` / ``from_config``: ``dtype`` since transformers 4.56,
  ``torch_dtype`` before (4.x passes an unknown ``dtype`` on to the model's ``__init__``: a TypeError).

Where a version cannot be supported, pyproject.toml's floor says why instead (transformers >= 5.12: 4.x cannot
run the planner's meta-device cost profile on torch 2.13). The dtype shim is kept for the loaders' sake: it
costs nothing on 5.x and lets ``load_model`` work on a 4.x that a user forces past the floor.

The checks read the installed transformers lazily (importing this module imports no transformers).
"""

from __future__ import annotations

import functools
from typing import Any

DTYPE_KEYWORD_SINCE = (4, 56)
"""The first transformers release whose ``from_pretrained`` / ``from_config`` take ``dtype`` (renamed from
``torch_dtype``)."""


@functools.lru_cache(maxsize=1)
def transformers_version() -> tuple[int, ...]:
    """The installed transformers' release as numbers, (4, 45, 0) for '4.45.0' (pre-releases count as their release)."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release


def dtype_keyword() -> str:
    """The keyword the installed transformers' ``from_pretrained`` and ``from_config`` read the dtype from."""
    return "dtype" if transformers_version()[:2] >= DTYPE_KEYWORD_SINCE else "torch_dtype"


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """``{keyword: dtype}`` for ``from_pretrained`` / ``from_config`` on the installed transformers; ``{}`` for None
    (the library's default)."""
    return {} if dtype is None else {dtype_keyword(): dtype}
