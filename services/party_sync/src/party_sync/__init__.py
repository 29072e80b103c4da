"""party_sync — the realtime party layer of RPG-Bot.

Rooms of the package (imports point inwards, towards ``protocol`` and ``core``):

- ``protocol``  — the wire contract: envelope, message types, error codes, JSON Schemas.
- ``core``      — pure party logic (presence, idempotency, sequencing, projection, rate limits):
                  no ``await``, no clock reads; time is passed in.
- ``backends``  — where party state and the event stream live (in-memory; Redis).
- ``engine``    — the Campaign Engine interface and its links (in-process, ...).
- ``transport`` — the WebSocket/HTTP server (aiohttp), kept thin and swappable.
- ``gateway``   — the orchestration that carries out the core's decisions over the backends.
"""

__version__ = "0.1.0"
