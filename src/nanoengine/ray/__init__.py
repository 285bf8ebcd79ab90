"""nanoengine on Ray, for work beyond one machine (the `ray` extra: pip install 'nanoengine[ray]').

- Ray Data: `NanoEngineGenerate` and `NanoEngineScore` are callable classes for
  `Dataset.map_batches(..., concurrency=N)`: each actor loads the model once and runs every batch
  it gets through `llm.generate` (or `llm.score`). `run_batch_on_ray` is `nanoengine batch --ray`:
  a batch file's lines answered by such actors, written and resumed as in one process.
- Ray Serve: `server_app` is `nanoengine serve`'s app (LLM Engine's and OpenAI's routes) as a
  Serve deployment with `num_replicas`; `serve.run(server_app(...))` answers the unmodified
  `llmengine` and `openai` clients across the replicas (`nanoengine serve --ray`).

`import nanoengine` never imports this package, nor Ray.
"""

from ..errors import NanoEngineError


class RayExtraMissing(NanoEngineError, ImportError):
    """Ray is not installed."""


try:
    import ray  # noqa: F401
except ImportError as err:
    raise RayExtraMissing("running on Ray needs the ray extra: pip install 'nanoengine[ray]'") from err

from .data import BatchLines, NanoEngineGenerate, NanoEngineScore, run_batch_on_ray  # noqa: E402
from .serve import NanoEngineServer, server_app  # noqa: E402

__all__ = ["BatchLines", "NanoEngineGenerate", "NanoEngineScore", "NanoEngineServer", "run_batch_on_ray", "server_app"]
