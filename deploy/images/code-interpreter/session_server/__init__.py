"""An HTTP server speaking Azure Container Apps' code interpreter API over a Jupyter kernel."""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
