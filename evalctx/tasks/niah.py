"""RULER needle-in-a-haystack: ``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``niah_multiquery``.

Wording from NVIDIA/RULER ``scripts/data/synthetic/niah.py`` and ``constants.py``: the plural template, rewritten to
the singular when one value is asked for (``Some``->``A``, ``are all``->``is``, ``are``->``is``, ``numbers``->
``number``); the needle keeps the plural ("One of the special magic numbers for {key} is: {value}."), as upstream.
Keys (``key_type``) and values (``value_type``) are RULER's ``words``, ``numbers`` or ``uuids``
(:mod:`evalctx.tasks.keys`); by default word keys and 7-digit number values. Noise haystacks hold one needle per
line (RULER joins lines with ``\\n``), as does the ``needle`` haystack of distractor needles
(:mod:`evalctx.tasks.distractors`); essay haystacks one per sentence boundary (joined with spaces). Several needles
go gkamradt-style: the first at the depth, the rest evenly spread after it; RULER shuffles the needle order, so do
we. RULER's eight named configurations are entries of the shipped ``ruler`` suite.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

from evalctx.errors import UsageError
from evalctx.tasks.distractors import distractor_haystack
from evalctx.tasks.haystack import Haystack, get_haystack
from evalctx.tasks.haystack_task import Draw, HaystackTask
from evalctx.tasks.keys import KINDS, draw, draw_pooled
from evalctx.tasks.placement import SENTINEL, Needle

TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_v} afterwards.\n{context}\n"
            "What are all the special magic {type_v} for {query} mentioned in the provided text?")
ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."

VALUE_TYPES = KEY_TYPES = KINDS
HAYSTACKS = ("noise", "essay", "essay_zh", "needle")


class NiahTask(HaystackTask):
    """Base of the RULER NIAH variants: ``num_k`` keys placed, ``num_v`` values per key, ``num_q`` keys asked."""

    num_k: ClassVar[int] = 1
    num_v: ClassVar[int] = 1
    num_q: ClassVar[int] = 1
    scorer = "string_match_all"
    default_max_new_tokens = 128  # RULER's tokens_to_generate for niah
    defaults: ClassVar[dict[str, Any]] = {"haystack": "noise", "haystack_dir": None, "key_type": "words",
                                          "value_type": "numbers"}

    def _haystack(self) -> Haystack:
        for opt, choices in (("haystack", HAYSTACKS), ("key_type", KEY_TYPES), ("value_type", VALUE_TYPES)):
            if self.options[opt] not in choices:
                raise UsageError(f"task {self.name}: unknown {opt} {self.options[opt]!r}: choose {', '.join(choices)}")
        if self.options["haystack"] == "needle":
            if self.options["haystack_dir"]:
                raise UsageError('option haystack_dir needs haystack = "essay"')
            return distractor_haystack(NEEDLE, self.options["key_type"], self.options["value_type"])
        return get_haystack(self.options["haystack"], self.options["haystack_dir"], joiner="\n")

    def id_options(self) -> dict[str, Any]:
        opts = super().id_options()
        if opts["key_type"] == "words":  # the only key kind before it became an option: old ids stay valid
            del opts["key_type"]
        return opts

    def _secret(self, kind: str, rng: random.Random) -> str:
        if self.options["haystack"] == "needle":  # never a distractor's key or value (see keys.py)
            return draw_pooled(kind, rng, distractor=False)
        return draw(kind, rng)

    def _draw(self, rng: random.Random, depth: float) -> Draw:
        type_v = self.options["value_type"]
        keys: list[str] = []
        while len(keys) < self.num_k:
            k = self._secret(self.options["key_type"], rng)
            if k not in keys:
                keys.append(k)
        values: list[list[str]] = []
        seen: set[str] = set()
        for _ in keys:
            vs: list[str] = []
            while len(vs) < self.num_v:
                v = self._secret(type_v, rng)
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
    description = "RULER niah_single: one key-value needle in noise, essay or distractor-needle text"


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
