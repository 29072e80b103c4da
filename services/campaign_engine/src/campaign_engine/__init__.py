"""Reference Campaign Engine for party_sync: a small, data-driven text RPG.

party_sync hosts it by default (``party-sync serve --engine campaign_engine:create_engine``), so
the package root exports the factory. Layout, imports pointing inwards:

- ``rules``      — dice and checks as pure functions;
- ``campaign``   — a campaign as data (+ ``sunken_lantern``, the built-in one);
- ``actions``    — the payload each action_type takes;
- ``state``, ``store`` — a run's state, and where it and the L1 chronicle live;
- ``game``, ``combat`` — what an action does to a run (pure);
- ``events``     — the protocol payloads published;
- ``engine``     — ``ReferenceEngine``: the ``party_sync.engine.Engine`` tying it together.
"""

from campaign_engine.engine import ReferenceEngine, create_engine

__all__ = ["ReferenceEngine", "create_engine"]
