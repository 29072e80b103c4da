"""What a connection is bound to: the party, campaign run and character its token names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Binding:
    """What a connection is bound to (from its token)."""

    party_id: str
    campaign_run_id: str
    character_id: str
    display_name: str
