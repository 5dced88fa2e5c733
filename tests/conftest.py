import pytest

from helpers import build


@pytest.fixture
def llama():
    return build("llama")
