"""The network edge: one aiohttp server for WebSocket, health checks, metrics and the HTTP API.

Only this package imports aiohttp's server side; the gateway sees a ``Sink`` and bytes, so the
WebSocket library can be swapped without touching the gateway.
"""
