"""Needle keys and values as RULER draws them: ``words`` (adjective-noun), ``numbers`` (7 digits), ``uuids`` (uuid4).

NVIDIA/RULER ``scripts/data/synthetic/niah.py`` (``generate_random``): numbers are ``randint(10**6, 10**7 - 1)``,
words ``random.choice`` of wonderwords' ``{adj}-{noun}`` pairs, uuids ``uuid.UUID(int=getrandbits(128),
version=4)``. The word lists here are our own (no dependency), so word keys are drawn from 151 x 127 pairs.

Distractor needles (the ``needle`` haystack) must never carry a key or value that a sample asks for. Instead of
checking every distractor against every draw, the strings of each kind are split in two halves by a hash: the
distractors use one half (:func:`in_distractor_pool`), asked keys and values the other. Which half a string falls
in says nothing a model could read, and the split is fixed, so it holds at every length and for every seed.
"""

from __future__ import annotations

import hashlib
import random
import uuid

KINDS = ("words", "numbers", "uuids")

ADJECTIVES = (
    "able ancient angry bitter blue bold brave brief bright broad busy calm careful cheap clever cold cool cozy "
    "crisp curious damp dark deep dizzy dry dull eager early easy empty fair famous fancy fast fierce flat "
    "fluffy foggy fragile fresh friendly funny gentle giant glad golden grand green gray happy hard heavy "
    "hollow honest huge humble hungry icy jolly kind large late lazy light little lively lonely loud lucky "
    "mellow merry mighty mild modern muddy narrow neat nervous noble noisy odd old orange pale patient plain "
    "polite proud purple quick quiet rapid rare red rich ripe rough round royal rusty sandy scarlet shaggy "
    "sharp shiny short silent silly silver simple sleepy slow small smooth snowy soft solid sour spicy "
    "steady steep sticky stormy strange strong sturdy sunny sweet swift tall tame tender thick thin tidy tiny "
    "tough upbeat vast violet warm weary wet wide wild windy wise witty wooden young zany"
).split()
NOUNS = (
    "acorn anchor apple arrow badge bakery balloon banjo barn basket beacon bell bench bicycle blanket boat "
    "bottle bridge bucket button cabin camera candle canoe canyon carpet castle cave chair chimney circus "
    "cliff clock cloud comet compass cookie cottage crayon crown cushion desert diamond dolphin door dragon "
    "drum eagle engine falcon feather fence fiddle forest fountain garden gate glacier globe guitar hammer "
    "harbor helmet hill horizon island jacket jungle kettle kite ladder lagoon lantern lemon library "
    "lighthouse magnet mango meadow mirror mountain napkin needle orchard otter oven paddle palace parrot "
    "pebble pencil piano pillow planet pocket pond puzzle quilt rabbit radio river rocket saddle sail "
    "scarf shell shovel sled spoon squirrel stable statue tiger tower tractor trumpet tunnel umbrella valley "
    "violin wagon walrus whistle window wizard yacht zebra"
).split()


def draw(kind: str, rng: random.Random) -> str:
    """One key or value of ``kind`` (see :data:`KINDS`); raises ValueError for another kind."""
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown key kind {kind!r}: choose one of {', '.join(KINDS)}")


def in_distractor_pool(s: str) -> bool:
    """Whether ``s`` belongs to the half of the strings that distractor needles use (asked ones never do)."""
    return hashlib.sha1(s.encode()).digest()[0] & 1 == 1


def distractor_words() -> list[str]:
    """Every ``words`` key of the distractors' half, sorted (9,642 of the 151 x 127 pairs)."""
    return sorted(w for w in (f"{a}-{n}" for a in ADJECTIVES for n in NOUNS) if in_distractor_pool(w))


def draw_pooled(kind: str, rng: random.Random, distractor: bool) -> str:
    """A draw from one half: the distractors' (``distractor=True``) or the asked keys' and values'."""
    while True:
        s = draw(kind, rng)
        if in_distractor_pool(s) == distractor:
            return s
