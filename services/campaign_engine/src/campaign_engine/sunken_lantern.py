"""The built-in campaign, "The Sunken Lantern", written as the JSON a campaign file holds.

It is plain data on purpose: ``json.dump(SUNKEN_LANTERN, f)`` gives a valid
``CAMPAIGN_ENGINE_CAMPAIGN`` file to start a new campaign from, and ``campaign.parse_campaign``
checks it exactly as it checks a file. Eight scenes: four story scenes with option checks and
flag-gated options, two fights (one avoidable, one that a clever party can talk its way around) and
two endings. Two of the story scenes are decided by a party vote (``party_vote``): the Reef Gate
(scene 2, where rowing out from the harbor leads) and the Keeper's Bargain; in the others, as in
the opening scene, any character chooses for the party.

Map (-> plain option, ~> option with a check, => fight's victory / defeat)::

    harbor -> reef, harbor ~> lighthouse|reef, harbor -[tide_path]-> lighthouse
    reef ~> lighthouse|claws, reef -> claws, reef -[kelp_rhyme]-> lighthouse
    claws => lighthouse / drowned (claws ~> lighthouse: flee)
    lighthouse -> vault, lighthouse ~> bargain|vault, lighthouse -[keepers_name]-> bargain
    vault => relit / drowned;  bargain ~> relit|vault, bargain -> vault
    endings: relit (the light burns again), drowned (a fight was lost)
    party votes (60 s): reef (climb | wade; a tie: wade), bargain (carry | refuse; a tie: carry)
"""

from __future__ import annotations

from typing import Any, Final

SUNKEN_LANTERN: Final[dict[str, Any]] = {
    "id": "sunken-lantern",
    "title": "The Sunken Lantern",
    "summary": (
        "The lighthouse of Gullmere has gone dark, and the storm tide is coming. Cross the reef, "
        "face what waits below the lighthouse, and relight the Sunken Lantern."
    ),
    "default_difficulty": 12,
    "vote_timeout_s": 60,
    "start": "harbor",
    "scenes": [
        {
            "id": "harbor",
            "number": 1,
            "title": "The Drowned Harbor",
            "kind": "story",
            "difficulty": 12,
            "narration": (
                "Rain hammers the harbor of Gullmere. Out on the reef the old lighthouse stands "
                "dark: its lantern, the Sunken Lantern that kept ships off the rocks for three "
                "hundred years, has gone out, and last night a fishing boat broke on the reef. "
                "The harbourmaster presses a coin into your hands: bring the light back before "
                "the storm tide."
            ),
            "check": {
                "skill": "wits",
                "flag": "tide_path",
                "success": (
                    "An old smuggler, warmed by your questions and your rum, sketches the hidden "
                    "tide path to the lighthouse on a wet napkin. You feel ready for anything."
                ),
                "partial": "You learn of a tide path across the reef, if not every turn of it.",
                "failure": "The fishermen only shake their heads and look at the sea.",
            },
            "options": [
                {"id": "row", "label": "Row out to the reef", "next": "reef"},
                {
                    "id": "swim",
                    "label": "Swim straight for the lighthouse",
                    "check": {
                        "skill": "agility",
                        "difficulty": 14,
                        "on_success": "lighthouse",
                        "on_partial": "lighthouse",
                        "on_failure": "reef",
                        "harm_on_partial": 3,
                        "harm_on_failure": 4,
                    },
                },
                {
                    "id": "tide_path",
                    "label": "Follow the smugglers' tide path",
                    "requires": "tide_path",
                    "next": "lighthouse",
                },
            ],
        },
        {
            "id": "reef",
            "number": 2,
            "title": "The Reef Gate",
            "kind": "story",
            "difficulty": 13,
            "narration": (
                "Your boat grinds onto black rock. Between you and the lighthouse rises the Reef "
                "Gate, a ring of jagged stone where the waves boil. Something with many legs "
                "clicks in the tide pools below."
            ),
            "check": {
                "skill": "lore",
                "flag": "kelp_rhyme",
                "success": "You remember the old rhyme: 'step where the kelp lies flat'.",
                "partial": "Half a rhyme comes back to you, something about kelp.",
                "failure": "Every rock looks as treacherous as the next.",
            },
            "party_vote": {
                "question": (
                    "The Reef Gate bars the way. Climb over the rocks, or wade through the tide "
                    "pools?"
                ),
                "default_option": "wade",
            },
            "options": [
                {
                    "id": "climb",
                    "label": "Climb over the Reef Gate",
                    "check": {
                        "skill": "might",
                        "difficulty": 13,
                        "on_success": "lighthouse",
                        "on_partial": "lighthouse",
                        "on_failure": "claws",
                        "harm_on_partial": 2,
                        "harm_on_failure": 2,
                    },
                },
                {"id": "wade", "label": "Wade through the tide pools", "next": "claws"},
                {
                    "id": "kelp",
                    "label": "Step only where the kelp lies flat",
                    "requires": "kelp_rhyme",
                    "next": "lighthouse",
                },
            ],
        },
        {
            "id": "claws",
            "number": 3,
            "title": "Reefclaws!",
            "kind": "combat",
            "difficulty": 12,
            "narration": (
                "Two reefclaws, crabs as large as hounds with shells crusted in barnacles, rise "
                "from the pools with their pincers snapping."
            ),
            "check": {
                "skill": "wits",
                "success": "You spot the soft joint behind a claw. Your next blow will tell.",
                "partial": "Their shells look thinner near the legs. Maybe.",
                "failure": "All you see is claws.",
            },
            "enemies": [
                {
                    "id": "reefclaw_old",
                    "name": "Barnacled Reefclaw",
                    "hp": 8,
                    "armor_class": 11,
                    "attack": 2,
                    "damage": "1d4+1",
                },
                {
                    "id": "reefclaw_young",
                    "name": "Young Reefclaw",
                    "hp": 6,
                    "armor_class": 10,
                    "attack": 1,
                    "damage": "1d4",
                },
            ],
            "options": [
                {
                    "id": "flee",
                    "label": "Scramble up the rocks and run for the lighthouse",
                    "check": {
                        "skill": "agility",
                        "difficulty": 13,
                        "on_success": "lighthouse",
                        "on_partial": "lighthouse",
                        "on_failure": "claws",
                        "harm_on_partial": 3,
                        "harm_on_failure": 2,
                    },
                }
            ],
            "on_victory": "lighthouse",
            "on_defeat": "drowned",
        },
        {
            "id": "lighthouse",
            "number": 4,
            "title": "The Dark Lighthouse",
            "kind": "story",
            "difficulty": 14,
            "narration": (
                "The lighthouse door hangs open. Inside, a spiral stair winds down, not up, into "
                "a flooded vault, and from below comes the slow drip of water and a voice like a "
                "tide going out: 'Who comes for my light?'"
            ),
            "check": {
                "skill": "lore",
                "flag": "keepers_name",
                "success": (
                    "Carved into the stair, worn almost smooth, is the name of the first keeper: "
                    "Maren Hollowell. Names have power over the drowned."
                ),
                "partial": "Letters worn almost smooth on the stair: M-A-R-E-N H-O-L-L...",
                "failure": "The carvings on the stair are worn past reading.",
            },
            "options": [
                {"id": "descend", "label": "Descend to the vault, weapons ready", "next": "vault"},
                {
                    "id": "parley",
                    "label": "Call down and bargain with the voice",
                    "check": {
                        "skill": "presence",
                        "difficulty": 15,
                        "on_success": "bargain",
                        "on_partial": "bargain",
                        "on_failure": "vault",
                    },
                },
                {
                    "id": "name",
                    "label": "Speak the first keeper's name",
                    "requires": "keepers_name",
                    "next": "bargain",
                },
            ],
        },
        {
            "id": "vault",
            "number": 5,
            "title": "The Drowned Keeper",
            "kind": "combat",
            "difficulty": 14,
            "narration": (
                "Knee-deep in black water stands the Drowned Keeper, the dark lantern chained to "
                "her wrist, her eyes two pale lights. She swings the lantern like a flail."
            ),
            "check": {
                "skill": "wits",
                "success": "The chain! Strike where it meets her wrist.",
                "partial": "She favours her left side, you think.",
                "failure": "The water and the dark hide everything.",
            },
            "enemies": [
                {
                    "id": "keeper",
                    "name": "The Drowned Keeper",
                    "hp": 16,
                    "armor_class": 13,
                    "attack": 4,
                    "damage": "1d6+2",
                }
            ],
            "on_victory": "relit",
            "on_defeat": "drowned",
        },
        {
            "id": "bargain",
            "number": 6,
            "title": "The Keeper's Bargain",
            "kind": "story",
            "difficulty": 13,
            "narration": (
                "The voice takes shape: a drowned woman in a keeper's coat, the dark lantern in "
                "her arms. 'I kept it three hundred years,' she says. 'Carry it up the stair and "
                "light it, and I may rest. Drop it, and you join me.'"
            ),
            "check": {
                "skill": "wits",
                "success": "The lantern's weight is in the chain, not the glass. Lift from below.",
                "partial": "It will be heavy. Very heavy.",
                "failure": "You cannot tell how heavy it is until you hold it.",
            },
            "party_vote": {
                "question": (
                    "The Drowned Keeper waits for your answer. Carry her Lantern up the stair, or "
                    "refuse her and draw steel?"
                )
            },
            "options": [
                {
                    "id": "carry",
                    "label": "Carry the Lantern up the stair",
                    "check": {
                        "skill": "might",
                        "difficulty": 12,
                        "on_success": "relit",
                        "on_partial": "relit",
                        "on_failure": "vault",
                        "harm_on_partial": 3,
                    },
                },
                {"id": "refuse", "label": "Refuse her, and draw steel", "next": "vault"},
            ],
        },
        {
            "id": "relit",
            "number": 7,
            "title": "The Lantern Relit",
            "kind": "ending",
            "narration": (
                "The wick catches. Light pours out over the reef, white and steady, and far out "
                "in the storm a ship turns away from the rocks. Below, the water in the vault "
                "goes still. Gullmere will tell this story for a hundred years."
            ),
        },
        {
            "id": "drowned",
            "number": 8,
            "title": "Drowned in the Dark",
            "kind": "ending",
            "narration": (
                "The tide takes you. Fishermen find you at dawn on the shingle, alive, barely, "
                "and the lighthouse still dark above the reef. Someone else will have to try."
            ),
        },
    ],
}
