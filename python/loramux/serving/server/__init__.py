"""The OpenAI-compatible HTTP server (`loramux serve`): every request's `model` names the base model
or a loaded adapter; adapters load and unload at run time. One module per concept (see each file)."""

from loramux.serving.server.run import ServeOptions, build, serve

__all__ = ["ServeOptions", "build", "serve"]
