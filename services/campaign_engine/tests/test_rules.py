"""The rules as pure functions: thresholds for every roll, modifier and DC; HP bounds; dice."""

from __future__ import annotations

import random

import pytest
from campaign_engine.rules import (
    DEFEND_BONUS,
    PARTIAL_MARGIN,
    Dice,
    Roll,
    apply_damage,
    apply_harm,
    attack_damage,
    check_outcome,
    defense_of,
    heal,
    outcome_rank,
    roll_check,
    strike_hits,
)
from hypothesis import given
from hypothesis import strategies as st

d20 = st.integers(1, 20)
modifiers = st.integers(-30, 30)
dcs = st.integers(-10, 60)


@given(d20, modifiers, dcs)
def test_outcome_follows_the_documented_thresholds(value: int, modifier: int, dc: int) -> None:
    outcome = check_outcome(value, modifier, dc)
    if value == 20:
        assert outcome == "success"
    elif value == 1:
        assert outcome == "failure"
    elif value + modifier >= dc:
        assert outcome == "success"
    elif value + modifier >= dc - PARTIAL_MARGIN:
        assert outcome == "partial"
    else:
        assert outcome == "failure"


@given(d20, d20, modifiers, dcs)
def test_a_higher_die_is_never_worse(a: int, b: int, modifier: int, dc: int) -> None:
    low, high = sorted((a, b))
    assert outcome_rank(check_outcome(low, modifier, dc)) <= outcome_rank(
        check_outcome(high, modifier, dc)
    )


@given(d20, modifiers, dcs, st.integers(0, 20))
def test_a_higher_dc_is_never_easier(value: int, modifier: int, dc: int, more: int) -> None:
    assert outcome_rank(check_outcome(value, modifier, dc + more)) <= outcome_rank(
        check_outcome(value, modifier, dc)
    )


@given(modifiers, dcs)
def test_natural_20_and_natural_1_ignore_modifiers(modifier: int, dc: int) -> None:
    assert check_outcome(20, modifier, dc) == "success"
    assert check_outcome(1, modifier, dc) == "failure"


def test_the_boundaries_by_example() -> None:
    assert check_outcome(10, 2, 12) == "success"  # total == DC
    assert check_outcome(9, 2, 12) == "partial"  # DC - 1
    assert check_outcome(6, 2, 12) == "partial"  # DC - 4
    assert check_outcome(5, 2, 12) == "failure"  # DC - 5


@pytest.mark.parametrize("value", [0, 21, -3])
def test_a_d20_cannot_show_more_or_less(value: int) -> None:
    with pytest.raises(ValueError, match=r"1\.\.20"):
        check_outcome(value, 0, 10)
    with pytest.raises(ValueError, match=r"1\.\.20"):
        strike_hits(value, 0, 10)


@given(d20, modifiers, dcs)
def test_roll_reports_what_the_protocol_wants(value: int, modifier: int, dc: int) -> None:
    roll = Roll(value, modifier, dc)
    assert roll.to_payload() == {
        "die": "d20",
        "value": value,
        "modifier": modifier,
        "total": value + modifier,
        "difficulty": dc,
    }
    assert roll.outcome == check_outcome(value, modifier, dc)
    assert str(roll.total) in roll.describe()


@given(st.integers(0, 2**32))
def test_roll_check_draws_one_d20(seed: int) -> None:
    roll = roll_check(random.Random(seed), 3, 12)
    assert 1 <= roll.value <= 20
    assert (roll.modifier, roll.difficulty) == (3, 12)


@given(st.integers(1, 20), st.integers(2, 100), st.integers(-100, 100), st.integers(0, 2**32))
def test_dice_parse_print_and_roll_in_range(count: int, sides: int, bonus: int, seed: int) -> None:
    dice = Dice(count, sides, bonus)
    assert Dice.parse(str(dice)) == dice
    rolled = dice.roll(random.Random(seed))
    assert 1 <= dice.lowest <= rolled <= dice.highest


@pytest.mark.parametrize("text", ["", "d6", "1d1", "0d6", "21d6", "1d6+", "1d6*2", "two d6"])
def test_bad_dice_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="dice"):
        Dice.parse(text)


@given(st.integers(-5, 200))
def test_attack_damage_by_outcome(rolled: int) -> None:
    assert attack_damage("success", rolled) == max(1, rolled)
    assert attack_damage("partial", rolled) == max(1, rolled // 2)
    assert attack_damage("failure", rolled) == 0


@given(d20, st.integers(-10, 30), st.integers(1, 40))
def test_strike_hits_at_defense(value: int, bonus: int, defense: int) -> None:
    expected = value == 20 or (value != 1 and value + bonus >= defense)
    assert strike_hits(value, bonus, defense) is expected


def test_defending_raises_defense() -> None:
    assert defense_of(12, defending=True) == 12 + DEFEND_BONUS
    assert defense_of(12, defending=False) == 12


@given(st.data())
def test_hp_never_leave_zero_to_max(data: st.DataObject) -> None:
    max_hp = data.draw(st.integers(1, 500))
    hp = data.draw(st.integers(0, max_hp))
    amount = data.draw(st.integers(-1000, 1000))
    for after in (apply_damage(hp, amount), apply_harm(hp, amount), heal(hp, amount, max_hp)):
        assert 0 <= after <= max_hp
    assert apply_damage(hp, amount) <= hp
    assert heal(hp, amount, max_hp) >= hp


@given(st.integers(1, 500), st.integers(0, 1000))
def test_harm_outside_combat_never_downs(hp: int, harm: int) -> None:
    assert 1 <= apply_harm(hp, harm) <= hp
    assert apply_harm(0, harm) == 0
