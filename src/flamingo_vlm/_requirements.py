"""Versions of the libraries flamingo-vlm needs, checked at import.

transformers 5.24 renamed the LM's KV-cache argument and output from ``past_key_values`` to ``cache``; an
older LM would take our ``cache=`` into its ``**kwargs`` and silently run without it (wrong logits when a
forward continues from a cache, no cache in beam search), so older versions are refused at import.
"""

from __future__ import annotations

from packaging.version import Version

MIN_TRANSFORMERS = "5.24"


def check_transformers(version: str) -> None:
    """Raise ImportError, naming the fix, if ``version`` of transformers is older than :data:`MIN_TRANSFORMERS`."""
    if Version(version) < Version(MIN_TRANSFORMERS):
        raise ImportError(
            f"flamingo-vlm needs transformers>={MIN_TRANSFORMERS} (the LM's KV cache is passed as `cache`), "
            f"found {version}: pip install -U 'transformers>={MIN_TRANSFORMERS},<6'"
        )
