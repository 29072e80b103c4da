"""The gateway: carries out the core's decisions for the connections of this node."""

from party_sync.gateway.gateway import Gateway
from party_sync.gateway.session import Session, Sink

__all__ = ["Gateway", "Session", "Sink"]
