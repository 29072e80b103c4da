"""The rules of the reference engine: pure functions, no I/O, no hidden randomness.

Everything random takes the ``random.Random`` it must draw from, so a seeded engine replays the
same game and the tests can script every die. Everything else is arithmetic on plain values, so it
is tested exhaustively (hypothesis) without an engine around it.

Checks (skill checks, option checks and attacks alike) roll **d20 + modifier against a difficulty
(DC)**:

- a natural 20 is always a success and a natural 1 always a failure, whatever the modifier;
- otherwise ``total >= DC`` is a success, ``total >= DC - 4`` a *partial* success ("yes, but":
  the thing happens at a cost, or a blow only glances), anything lower a failure.

Attacks use the enemy's armour class as the DC: a success deals the full damage roll, a partial
half of it (at least 1), a failure nothing. An enemy that is still standing strikes back at the
acting character: d20 + its attack bonus against the character's defense (+4 while defending); a
natural 20 always hits, a natural 1 always misses. HP never leave ``0..max_hp``; a character at 0
HP is *downed*. Harm taken outside combat (a bad fall, a cold swim) never downs anyone: it leaves
at least 1 HP, because only a fight should be able to end a character's part in the story.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

Outcome = Literal["success", "partial", "failure"]

D20: Final = 20
#: How far below the DC a total may fall and still be a partial success.
PARTIAL_MARGIN: Final = 4
#: Defense bonus of a character who chose the ``defend`` move, until their next action.
DEFEND_BONUS: Final = 4
#: Bonus of an ``inspired`` character on their next d20 roll (the effect is then spent).
INSPIRED_BONUS: Final = 2

_RANK: Final[dict[Outcome, int]] = {"failure": 0, "partial": 1, "success": 2}
_DICE = re.compile(r"^\s*(\d{1,2})d(\d{1,3})\s*(?:([+-])\s*(\d{1,3}))?\s*$")


def outcome_rank(outcome: Outcome) -> int:
    """Order outcomes (failure < partial < success), e.g. to state monotonicity in tests."""
    return _RANK[outcome]


def check_outcome(value: int, modifier: int, difficulty: int) -> Outcome:
    """Outcome of a d20 showing ``value`` plus ``modifier`` against ``difficulty``.

    >>> check_outcome(20, -10, 30), check_outcome(1, 50, 5)
    ('success', 'failure')
    >>> check_outcome(8, 2, 12), check_outcome(5, 2, 12)
    ('partial', 'failure')
    """
    if not 1 <= value <= D20:
        raise ValueError(f"a d20 shows 1..20, not {value}")
    if value == D20:
        return "success"
    if value == 1:
        return "failure"
    total = value + modifier
    if total >= difficulty:
        return "success"
    if total >= difficulty - PARTIAL_MARGIN:
        return "partial"
    return "failure"


@dataclass(frozen=True, slots=True)
class Roll:
    """One d20 roll against a difficulty, as it is reported in ``action.result``'s ``roll``."""

    value: int
    modifier: int
    difficulty: int

    @property
    def total(self) -> int:
        return self.value + self.modifier

    @property
    def outcome(self) -> Outcome:
        return check_outcome(self.value, self.modifier, self.difficulty)

    def describe(self) -> str:
        """``"14+3=17 vs 12"``: the arithmetic a player wants to see in the narration."""
        sign = "+" if self.modifier >= 0 else "-"
        return f"{self.value}{sign}{abs(self.modifier)}={self.total} vs {self.difficulty}"

    def to_payload(self) -> dict[str, Any]:
        """The protocol's ``roll`` object (protocol-v1, action.result)."""
        return {
            "die": "d20",
            "value": self.value,
            "modifier": self.modifier,
            "total": self.total,
            "difficulty": self.difficulty,
        }


def roll_d20(rng: random.Random) -> int:
    return rng.randint(1, D20)


def roll_check(rng: random.Random, modifier: int, difficulty: int) -> Roll:
    return Roll(roll_d20(rng), modifier, difficulty)


@dataclass(frozen=True, slots=True)
class Dice:
    """Damage dice such as ``1d6+2``: ``count`` dice of ``sides`` sides plus ``bonus``."""

    count: int
    sides: int
    bonus: int = 0

    @classmethod
    def parse(cls, text: str) -> Dice:
        """Parse ``NdM``, ``NdM+K`` or ``NdM-K`` (1 <= N <= 20, 2 <= M <= 100, |K| <= 100)."""
        match = _DICE.match(text)
        if match is None:
            raise ValueError(f"dice must look like '1d6' or '2d4+1', not {text!r}")
        count, sides = int(match[1]), int(match[2])
        bonus = int(match[4] or 0) * (-1 if match[3] == "-" else 1)
        if not 1 <= count <= 20 or not 2 <= sides <= 100 or abs(bonus) > 100:
            raise ValueError(f"dice out of range (1-20 dice of 2-100 sides, bonus ±100): {text!r}")
        return cls(count, sides, bonus)

    @property
    def lowest(self) -> int:
        return max(1, self.count + self.bonus)

    @property
    def highest(self) -> int:
        return max(1, self.count * self.sides + self.bonus)

    def roll(self, rng: random.Random) -> int:
        """Roll the damage; a hit always hurts, so the result is at least 1."""
        return max(1, sum(rng.randint(1, self.sides) for _ in range(self.count)) + self.bonus)

    def __str__(self) -> str:
        if self.bonus == 0:
            return f"{self.count}d{self.sides}"
        return f"{self.count}d{self.sides}{'+' if self.bonus > 0 else '-'}{abs(self.bonus)}"


def attack_damage(outcome: Outcome, rolled: int) -> int:
    """Damage an attack deals: full on a success, half (at least 1) on a partial, 0 on a miss."""
    if outcome == "success":
        return max(1, rolled)
    if outcome == "partial":
        return max(1, rolled // 2)
    return 0


def strike_hits(value: int, attack_bonus: int, defense: int) -> bool:
    """Does an enemy's strike (d20 ``value`` + ``attack_bonus``) beat a character's defense?"""
    if not 1 <= value <= D20:
        raise ValueError(f"a d20 shows 1..20, not {value}")
    if value == D20:
        return True
    if value == 1:
        return False
    return value + attack_bonus >= defense


def defense_of(base: int, *, defending: bool) -> int:
    return base + (DEFEND_BONUS if defending else 0)


def apply_damage(hp: int, damage: int) -> int:
    """HP after combat damage: never below 0 (0 means downed); negative damage counts as 0."""
    return max(0, hp - max(0, damage))


def apply_harm(hp: int, harm: int) -> int:
    """HP after harm outside combat: it never takes a standing character below 1."""
    if hp <= 0:
        return 0
    return max(1, hp - max(0, harm))


def heal(hp: int, amount: int, max_hp: int) -> int:
    """HP after healing: never above ``max_hp``, never below 0."""
    return min(max_hp, max(0, hp) + max(0, amount))
