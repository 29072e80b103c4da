"""Servers that party_sync is measured against: baselines, not part of the product.

- ``socketio_server``: the peer a Python team would otherwise pick (python-socketio with its
  AsyncRedisManager on uvicorn), playing the same scenario with the same engine logic.
- ``floor_*``: minimal broadcast servers, one per WebSocket library: one message in, decoded and
  re-encoded with orjson, sent to the 4 members of its room; no auth, no validation, no Redis.
  They show what the hardware and each library allow.

Every floor serves ``ws://HOST:PORT/ws/<room>``.
"""
