"""Where backbones come from: a missing local path is named clearly (not as a malformed hub repo id), and
``from_pretrained`` runs quietly: no progress bars, and a vision tower read out of a full CLIP / SigLIP
checkpoint does not report that checkpoint's text tower as unexpected keys (anything else it reports is
still raised or warned about, in our words)."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

# What a full CLIPModel / SiglipModel checkpoint holds beside its vision tower: expected, not loaded.
OTHER_TOWER_KEYS = re.compile(r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$|logit_bias$)")
_HINTS = {"lm": "--lm PATH_OR_HUB_NAME (lm= in load_flamingo)", "vision": "--vision PATH_OR_HUB_NAME (vision= in load_flamingo)"}


def _looks_local(name: str) -> bool:
    """A path rather than a hub name (``org/name``): absolute, ``./``, ``../``, ``~``, or more than one ``/``."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def check_backbone_source(name_or_path: Any, role: str) -> None:
    """Refuse a backbone path that does not exist, naming it, the working directory and the override flag.

    role: ``"lm"`` or ``"vision"``. Objects and hub names (``org/name``) pass (the hub is asked later).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        return
    name = os.fspath(name_or_path)
    if os.path.exists(os.path.expanduser(name)) or not _looks_local(name):
        return
    raise FileNotFoundError(
        f"the {role} backbone {name!r} is not there (looked in {os.path.abspath(os.path.expanduser(name))!r}, "
        f"working directory {os.getcwd()!r}): pass its current location with {_HINTS.get(role, role)}"
    )


def add_backbone_arguments(parser: Any) -> None:
    """``--lm`` / ``--vision``: where a saved model's backbones are now, if not where its config names them
    (for the commands that load a saved model: generate, eval, serve)."""
    parser.add_argument("--lm", default=None, metavar="PATH_OR_HUB_NAME",
                        help="load the language model from here instead of where the saved config names it (e.g. it moved)")
    parser.add_argument("--vision", default=None, metavar="PATH_OR_HUB_NAME",
                        help="load the vision encoder from here instead of where the saved config names it")


def _hub_or_missing(e: Exception, name: str, role: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"cannot load the {role} backbone {name!r}: neither a local directory (working directory {os.getcwd()!r}) "
        f"nor a hub model that can be downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
        f"pass its location with {_HINTS.get(role, role)}"
    )


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' progress bars off for the block (restored after)."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_transformers_logs() -> Iterator[None]:
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_pretrained(cls: Any, name_or_path: Any, role: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(name_or_path, **kwargs)`` without progress bars, a missing path named clearly."""
    check_backbone_source(name_or_path, role)
    try:
        with quiet_progress():
            return cls.from_pretrained(name_or_path, **kwargs)
    except OSError as e:  # also huggingface_hub's validation / not-found errors on a name that is neither
        if isinstance(name_or_path, (str, os.PathLike)) and not os.path.exists(os.fspath(name_or_path)):
            raise _hub_or_missing(e, os.fspath(name_or_path), role) from e
        raise


def load_vision_tower(cls: Any, name_or_path: Any, **kwargs: Any) -> Any:
    """A transformers vision model (``CLIPVisionModel``, ``SiglipVisionModel``) from a checkpoint of it or of
    the full two-tower model, quietly. The other tower's weights are expected and skipped; a weight of the
    vision tower missing from the checkpoint is an error (it would be random), any other unexpected key a
    warning."""
    check_backbone_source(name_or_path, "vision")
    try:
        with quiet_progress(), _quiet_transformers_logs():
            model, info = cls.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except OSError as e:
        if isinstance(name_or_path, (str, os.PathLike)) and not os.path.exists(os.fspath(name_or_path)):
            raise _hub_or_missing(e, os.fspath(name_or_path), "vision") from e
        raise
    except RuntimeError as e:  # weights of other shapes (its report was silenced with the rest)
        raise ValueError(f"{name_or_path}: not a {cls.__name__} checkpoint: weights of other shapes ({e})") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"{name_or_path}: {len(missing)} weight(s) of the vision tower are not in the checkpoint "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): it is not a {cls.__name__} checkpoint"
        )
    unexpected = sorted(k for k in (info.get("unexpected_keys") or []) if not OTHER_TOWER_KEYS.match(k))
    if unexpected:
        warnings.warn(
            f"{name_or_path}: {len(unexpected)} key(s) of the checkpoint are not used by {cls.__name__} "
            f"({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''})",
            stacklevel=2,
        )
    return model


__all__ = ["add_backbone_arguments", "check_backbone_source", "load_pretrained", "load_vision_tower", "quiet_progress"]
