"""``flamingo serve``: an HTTP API and a web page for interleaved few-shot prompting of a Flamingo model.

    from flamingo_vlm import load_flamingo
    from flamingo_vlm.serving import create_app
    app = create_app(*load_flamingo("flamingo-demo/model"))   # then: uvicorn.run(app)
"""

from .app import create_app
from .batching import BatchInfo, Batcher
from .errors import RequestError
from .schemas import GenerateRequest, Limits, ScoreRequest

__all__ = ["BatchInfo", "Batcher", "GenerateRequest", "Limits", "RequestError", "ScoreRequest", "create_app"]
