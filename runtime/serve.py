"""An OpenAI-compatible completions server: llama-cpp-python's own, bound to localhost by default."""

from __future__ import annotations

from pathlib import Path

from neoxq.core.errors import MissingExtraError
from neoxq.core.gguf_info import read_info
from neoxq.core.machine import default_threads

from .model import gpu_offload_supported


def build_app(model: Path | str, n_ctx: int | None = None, n_threads: int | None = None, n_gpu_layers: int | None = None,
              flash_attn: str = "auto"):
    info = read_info(model)  # one clear error for a missing/corrupt/non-NeoX file, before the server starts
    try:
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        raise MissingExtraError(f"the server needs extra packages ({exc.name} is missing); install them with: pip install 'neoxq[server]'") from exc
    from .model import resolve_flash_attn

    n_gpu = n_gpu_layers if n_gpu_layers is not None else (-1 if gpu_offload_supported() else 0)
    settings = ModelSettings(
        model=str(info.path), model_alias=info.path.stem, n_ctx=n_ctx or info.context_length or 2048,
        n_threads=n_threads or default_threads(), n_threads_batch=n_threads or default_threads(),
        n_gpu_layers=n_gpu, flash_attn=resolve_flash_attn(flash_attn, n_gpu), verbose=False,
    )
    return create_app(server_settings=ServerSettings(), model_settings=[settings])


def serve(model: Path | str, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    import uvicorn

    uvicorn.run(build_app(model, **kw), host=host, port=port, log_level="warning")
