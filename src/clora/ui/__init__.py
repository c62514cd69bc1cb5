"""``clora ui``: a local web app (Gradio) for composing LoRAs with CLoRA.

Gradio is an optional extra (``pip install clora-diffusion[ui]``); the form's logic
(``clora.ui.form``) and the generation runner (``clora.ui.runner``) do not need it.
"""

from __future__ import annotations

from typing import Any

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def require_gradio() -> None:
    """One line saying how to install Gradio, when it is missing."""
    from ..errors import CLoRAError

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CLoRAError(
            "ui: the web UI needs Gradio; install it with pip install 'clora-diffusion[ui]' (or run ./run ui)"
        ) from None


def serve(runner: Any, host: str, port: int) -> None:
    """Serve the app until interrupted (Gradio is imported here, not before)."""
    require_gradio()
    from .app import serve as serve_app

    serve_app(runner, host, port)
