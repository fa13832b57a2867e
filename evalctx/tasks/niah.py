"""RULER needle-in-a-haystack: ``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``niah_multiquery``.

Wording from NVIDIA/RULER ``scripts/data/synthetic/niah.py`` and ``constants.py``: the plural template, rewritten to
the singular when one value is asked for (``Some``->``A``, ``are all``->``is``, ``are``->``is``, ``numbers``->
``number``); the needle keeps the plural ("One of the special magic numbers for {key} is: {value}."), as upstream.
Keys are adjective-noun pairs like RULER's wonderwords ``{adj}-{noun}`` (our own word lists, so no dependency);
values are 7-digit numbers or uuid4 strings. Noise haystacks hold one needle per line (RULER joins lines with
``\\n``), essay haystacks one per sentence boundary (joined with spaces). Several needles go gkamradt-style: the
first at the depth, the rest evenly spread after it; RULER shuffles the needle order, so do we.
"""

from __future__ import annotations

import random
import uuid
from typing import Any, ClassVar

from evalctx.errors import UsageError
from evalctx.tasks.haystack import Haystack, get_haystack
from evalctx.tasks.haystack_task import Draw, HaystackTask
from evalctx.tasks.placement import SENTINEL, Needle

TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_v} afterwards.\n{context}\n"
            "What are all the special magic {type_v} for {query} mentioned in the provided text?")
ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."

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
VALUE_TYPES = ("numbers", "uuids")
HAYSTACKS = ("noise", "essay")


class NiahTask(HaystackTask):
    """Base of the RULER NIAH variants: ``num_k`` keys placed, ``num_v`` values per key, ``num_q`` keys asked."""

    num_k: ClassVar[int] = 1
    num_v: ClassVar[int] = 1
    num_q: ClassVar[int] = 1
    scorer = "string_match_all"
    default_max_new_tokens = 128  # RULER's tokens_to_generate for niah
    defaults: ClassVar[dict[str, Any]] = {"haystack": "noise", "haystack_dir": None, "value_type": "numbers"}

    def _haystack(self) -> Haystack:
        if self.options["haystack"] not in HAYSTACKS:
            raise UsageError(f"task {self.name}: unknown haystack {self.options['haystack']!r}: choose noise or essay")
        if self.options["value_type"] not in VALUE_TYPES:
            raise UsageError(f"task {self.name}: unknown value_type {self.options['value_type']!r}: "
                             "choose numbers or uuids")
        return get_haystack(self.options["haystack"], self.options["haystack_dir"], joiner="\n")

    def _value(self, rng: random.Random) -> str:
        if self.options["value_type"] == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return str(rng.randint(10**6, 10**7 - 1))

    def _draw(self, rng: random.Random, depth: float) -> Draw:
        type_v = self.options["value_type"]
        keys: list[str] = []
        while len(keys) < self.num_k:
            k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
            if k not in keys:
                keys.append(k)
        values: list[list[str]] = []
        seen: set[str] = set()
        for _ in keys:
            vs: list[str] = []
            while len(vs) < self.num_v:
                v = self._value(rng)
                if v not in seen:  # a repeated value would make string_match_all ambiguous
                    seen.add(v)
                    vs.append(v)
            values.append(vs)
        texts = [NEEDLE.format(type_v=type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(texts)
        asked = rng.sample(range(self.num_k), self.num_q)
        queries = [keys[i] for i in asked]
        answers = [v for i in asked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix, tv = TEMPLATE, ANSWER_PREFIX, type_v
        if self.num_q * self.num_v == 1:  # RULER's single-answer rewrite, in its order
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            prefix = prefix.replace("are", "is")
            tv = type_v[:-1]
        user = template.format(type_v=tv, context=SENTINEL, query=query)
        sep = "\n" if self.haystack.unit == "line" else " "
        n = len(texts)
        depths = [depth + i * (1.0 - depth) / n for i in range(n)]
        return Draw(user_text=user, answer_prefix=prefix.format(type_v=tv, query=query),
                    needles=[Needle(t, sep) for t in texts], depths=depths, targets=answers,
                    secrets=keys + sorted(seen),
                    meta={"template": "ruler", "key": query, "keys": keys, "value_type": type_v})


class NiahSingle(NiahTask):
    name = "niah_single"
    description = "RULER niah_single: one key-value needle (7-digit number) in noise or essay text"


class NiahMultikey(NiahTask):
    name = "niah_multikey"
    num_k = 4
    description = "RULER niah_multikey_1: four key-value needles, one key asked"
    defaults: ClassVar[dict[str, Any]] = {**NiahTask.defaults, "haystack": "essay"}


class NiahMultivalue(NiahTask):
    name = "niah_multivalue"
    num_v = 4
    description = "RULER niah_multivalue: one key with four values, all asked"
    defaults: ClassVar[dict[str, Any]] = {**NiahTask.defaults, "haystack": "essay"}


class NiahMultiquery(NiahTask):
    name = "niah_multiquery"
    num_k = 4
    num_q = 4
    description = "RULER niah_multiquery: four key-value needles, all four keys asked"
    defaults: ClassVar[dict[str, Any]] = {**NiahTask.defaults, "haystack": "essay"}
