"""Kept for tests that import it by this name: the real server in a background thread."""

from server.embedded import EmbeddedServer as ServerThread

__all__ = ["ServerThread"]
