"""Reference Campaign Engine for party_sync: a small, data-driven text RPG.

party_sync hosts it by default (``party-sync serve --engine campaign_engine:create_engine``), so
the package root exports the factory. Layout, imports pointing inwards:

- ``rules``      — dice and checks as pure functions;
- ``campaign``   — a campaign as data (+ ``campaign_fields``, its strict readers, and
  ``sunken_lantern``, the built-in one);
- ``actions``    — the payload each action_type takes;
- ``state``      — a run's state;
- ``game``, ``combat`` — what an action does to a run (pure);
- ``events``     — the protocol payloads published;
- ``votes``      — party votes: when the engine starts one, what it locks, what settles it;
- ``chronicle``  — the L1 decisions and L2 scene summaries;
- ``store``      — where runs and chronicles live: in memory, or ``sql_store`` (schema, queries)
  over ``sql_drivers`` (SQLite, PostgreSQL);
- ``engine``     — ``ReferenceEngine``: the ``party_sync.engine.Engine`` tying it together;
- ``cli``        — ``campaign-engine describe`` / ``chronicle``.
"""

from campaign_engine.engine import ReferenceEngine, create_engine

__all__ = ["ReferenceEngine", "create_engine"]
