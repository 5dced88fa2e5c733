import pytest

from helpers import build


@pytest.fixture(scope="module")
def processor():
    """The processor of a tiny llama Flamingo (a module may define its own ``processor`` instead)."""
    return build("llama")[1]
