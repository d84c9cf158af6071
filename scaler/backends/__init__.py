"""Ways of running feed handlers: local processes, Docker containers, a Swarm service."""

from scaler.backends.base import Backend, BackendError, BackendHealth, HandlerInstance, HandlerSpec

__all__ = ["Backend", "BackendError", "BackendHealth", "HandlerInstance", "HandlerSpec"]
