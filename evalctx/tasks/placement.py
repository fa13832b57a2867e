"""The exact-length assembler shared by all tasks: ``pre + haystack-with-needles + post`` at exactly L tokens.

Work happens in token space. The haystack is a window of the cached filler token stream (a slice of the filler
text found through the token offsets); needles go at sentence boundaries. Only the seams (template/haystack,
haystack/needle, haystack/post) can tokenize differently from the cached stream, so the length of a candidate
layout is *estimated* by re-tokenizing just a few tokens of haystack around each seam. The estimate is then
checked by ONE tokenization of the final text, whose ids become ``Sample.prompt_ids``. When a seam behaves
non-locally the difference is remembered per (tokenizer, template, haystack) -- the seam calibration -- so later
builds of the same frame are exact on their first verification.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Sequence

from evalctx.errors import LengthError, UsageError
from evalctx.tasks.haystack import Haystack, TokenStream
from evalctx.models.tokenizer import Tokenizer

SENTINEL = "@@EVALCTX_HAYSTACK@@"
"""Stands for the haystack while a template (or a chat template) is rendered; split out afterwards."""

PROMPT_MODES = ("raw", "chat")
_MARGIN = 8  # haystack tokens re-tokenized on each side of a seam: far more than any merge reaches
_SLACK = 2048  # stream tokens kept beyond the window, so the end can move to the next sentence boundary
_MAX_VERIFY = 12
"""Full tokenizations before giving up. Most prompts verify on the first or second; with a ByteLevel
``add_prefix_space`` tokenizer the seam estimate is off by one either way from layout to layout, and 5 left about
1 in 70 samples unbuildable at lengths far above the minimum (unsupported rows nothing found up front); a
sample that needed 8 is in test_placement."""
_TAILS = 7  # whitespace pads _Builder._pad_text knows
_SEARCH = 8  # how far (in tokens) the cut may move when no budget gives the exact count
_RESIDUAL: dict[tuple, int] = {}  # seam calibration: verified - estimated, per (tokenizer, frame, haystack)
_SPECIAL: dict[str, int] = {}


@dataclass(frozen=True)
class Frame:
    """The prompt around the haystack, already rendered (chat template and answer prefix included)."""

    pre: str
    post: str
    add_special_tokens: bool
    mode: str
    pre_template: int = 0
    """Characters at the start of ``pre`` that the chat template wrote: its special tokens count as such. The
    rest of ``pre`` (the instruction), the haystack and the needles are text."""
    post_template: tuple[int, int] = (0, 0)
    """The span of ``post`` that the chat template wrote, between the question and the answer prefix."""

    def spans(self, part: str) -> list[tuple[int, int]]:
        """Template spans of ``pre`` or ``post``, relative to that part (empty in raw mode)."""
        if part == "pre":
            return [(0, self.pre_template)] if self.pre_template else []
        a, b = self.post_template
        return [(a, b)] if b > a else []


@dataclass(frozen=True)
class Needle:
    """Text inserted at a boundary, followed by ``sep`` unless it ends the haystack (then ``post`` follows)."""

    text: str
    sep: str = ""


def render_frame(tokenizer: Tokenizer, prompt_mode: str, user_text: str, answer_prefix: str) -> Frame:
    """Split a prompt around :data:`SENTINEL`.

    Raw mode: ``user_text + answer_prefix``, tokenized with special tokens (BOS counts toward the length).
    Chat mode: the tokenizer's chat template over one user turn, then the answer prefix (leading whitespace
    dropped, as lm-eval's ``gen_prefix``) starts the assistant turn; tokenized without special tokens because the
    rendered template already carries BOS as text. Special-token strings count as special tokens only in what the
    template itself wrote (``Frame.pre_template``/``post_template``); the user text and the answer prefix are text.
    A template that rewrites the user text (so it cannot be found in the rendering) has its whole ``pre`` and
    ``post`` but the answer prefix treated as template.
    """
    if user_text.count(SENTINEL) != 1:
        raise ValueError("user_text must hold the haystack sentinel exactly once")
    if prompt_mode == "raw":
        pre, post = (user_text + answer_prefix).split(SENTINEL)
        return Frame(pre, post, True, prompt_mode)
    elif prompt_mode == "chat":
        if not tokenizer.has_chat_template():
            raise UsageError(f"tokenizer {tokenizer.name} has no chat template: use prompt_mode = \"raw\"")
        try:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": user_text}])
        except UsageError:
            raise
        except Exception as exc:  # Jinja errors come in many types; the user needs one line
            raise UsageError(f"chat template of {tokenizer.name} failed: {type(exc).__name__}: {exc}") from exc
        if rendered.count(SENTINEL) != 1:
            raise UsageError(f"chat template of {tokenizer.name} rewrites the user text; cannot place a haystack")
    else:
        raise UsageError(f"unknown prompt_mode {prompt_mode!r}: choose raw or chat")
    pre, post = (rendered + answer_prefix.lstrip()).split(SENTINEL)
    head, question = user_text.split(SENTINEL)
    at = rendered.find(user_text)
    if at < 0 or rendered.count(user_text) != 1:
        # The template rewrote the user text: everything it wrote around the haystack counts as template.
        return Frame(pre, post, False, prompt_mode, len(pre), (0, len(post) - len(answer_prefix.lstrip())))
    tail = len(rendered) - at - len(user_text)
    return Frame(pre, post, False, prompt_mode, at, (len(question), len(question) + tail))


@dataclass
class Assembly:
    """A verified prompt of exactly the asked length, and where its needles landed."""

    text: str
    ids: list[int]
    needle_token_indices: list[int]
    """Index in ``ids`` of each needle's first token, in needle order."""
    needle_chars: list[int]
    """Character offset of each needle in ``text``."""
    haystack_start_token: int
    haystack_tokens: int
    """Tokens of the context that are haystack (needles not counted)."""
    depth_actual: float | None
    window: tuple[int, int]
    """Haystack character range in the filler stream."""
    positions: list[int]
    """Stream character offset where each needle was inserted."""
    verifications: int = 1
    special_spans: list[tuple[int, int]] | None = None
    """Character spans of ``text`` written by the chat template: ``ids`` is ``tokenizer.encode(text,
    add_special_tokens, special_spans)`` (empty in raw mode: the whole prompt is text)."""

    @property
    def needle_token_index(self) -> int:
        return min(self.needle_token_indices)


@dataclass(frozen=True)
class _Layout:
    a: int  # first whole haystack token (stream index)
    s: int  # first haystack char (stream): starts[a], or inside token a - 1 when the window starts mid-token
    e: int  # haystack end char, exclusive (stream)
    positions: tuple[int, ...]  # insertion char (stream) per needle, non-decreasing
    glue: int = 0  # before a needle at the end: see _Builder._glue_text
    tail: int = 0  # whitespace between the haystack's end and ``post``: see _Builder._pad_text


def special_token_count(tokenizer: Tokenizer) -> int:
    """How many ids ``add_special_tokens=True`` adds: the leading specials (BOS), never a trailing EOS."""
    fp = tokenizer.fingerprint()
    if fp not in _SPECIAL:
        probe = "Hello there."
        _SPECIAL[fp] = len(tokenizer.encode(probe, True)) - len(tokenizer.encode(probe, False))
    return _SPECIAL[fp]


class _Builder:
    def __init__(self, tokenizer: Tokenizer, frame: Frame, haystack: Haystack, needles: Sequence[Needle],
                 depths: Sequence[float]) -> None:
        self.tok, self.frame, self.hay = tokenizer, frame, haystack
        self.needles, self.depths = list(needles), list(depths)
        self.at_end = max(depths) >= 1.0  # a needle touches ``post``: a different end seam
        self.n_special = special_token_count(tokenizer) if frame.add_special_tokens else 0
        self.st: TokenStream = haystack.stream(tokenizer, _SLACK)
        self._est: dict[_Layout, int] = {}

    def count(self, text: str, spans: Sequence[tuple[int, int]] = ()) -> int:
        return len(self.tok.encode(text, add_special_tokens=False, special_spans=spans))

    def encode(self, text: str, spans: Sequence[tuple[int, int]]) -> list[int]:
        """The whole prompt's ids, as :func:`assemble` verifies them."""
        return self.tok.encode(text, self.frame.add_special_tokens, spans)

    def ensure(self, h: int) -> None:
        if len(self.st) < h + _SLACK:
            self.st = self.hay.stream(self.tok, h + _SLACK)

    # -- layouts ------------------------------------------------------------------------------------------------------
    def layout(self, h: int, alt: int = 0, cut: int = 0, shift: int = 0, glue: int = 0, tail: int = 0) -> _Layout:
        """The haystack window of ``h`` tokens and its needle positions; the other arguments are fallbacks.

        The window starts at stream token 0 and ends at token ``h`` (possibly mid-sentence), whatever the depths,
        so prompts that differ only in their needles' depths share everything before the earlier needle (the
        prefix a depth sweep reuses, evalctx/run/prefix_order.py). Needles at depth < 1 go at the sentence (or line)
        boundary nearest their depth; needles at depth 1 go at the window's end, right before ``post``, after a
        possibly cut last sentence -- as gkamradt's needle test (trim the context, append the needle at depth 100)
        and RULER (needle after the last, possibly partial, sentence) do. :meth:`needle_insert` puts the
        haystack's joiner between a cut sentence and the needle.

        The fallbacks decouple the two ends of the window when a seam makes the count jump over the target (the
        count moves by 2 when ``h`` moves by 1): ``alt`` takes the other nearest boundary for the first needle;
        ``cut`` makes the window's end fall ``cut`` characters inside a token; ``glue`` puts the joiner before a
        needle at the end also after a whole sentence (1: a blank line) or leaves it out (2) -- a line end, then
        ``The`` and a joiner, add two tokens where one was wanted; ``shift`` starts the window ``shift`` tokens
        later (a different start seam; the one fallback that costs a depth sweep its sharing, so the last).
        """
        self.ensure(h + shift)
        st = self.st
        a = shift
        e = st.starts[a + h]
        if cut and st.starts[a + h + 1] - e > cut:  # cut inside a token (a partial token ends the haystack)
            e += cut
        s = st.starts[a]
        h_eff = st.token_at(e) - a
        positions: list[int] = []
        for i, d in enumerate(self.depths):
            if d >= 1.0:
                p = e
            else:
                p = self._nearest_boundary(a + round(d * h_eff), s, e, flip=(alt > 0 and i == 0))
            positions.append(max(p, positions[-1]) if positions else p)
        return _Layout(a, s, e, tuple(positions), glue if e in positions else 0, tail)

    def _nearest_boundary(self, x_tok: int, s: int, e: int, flip: bool) -> int:
        """The sentence boundary in [s, e] nearest (in tokens) to token ``x_tok``; ``flip`` takes the other one."""
        st = self.st
        x = st.starts[x_tok]
        lo = self.hay.boundary_at_or_before(x)
        hi = self.hay.boundary_at_or_after(x)
        cands = [c for c in (lo, hi) if s <= c <= e]
        if not cands:  # no boundary inside the window (only when it holds less than a sentence)
            return s
        cands.sort(key=lambda c: abs(st.token_at(c) - x_tok))
        return cands[-1] if flip else cands[0]

    # -- text and estimate -------------------------------------------------------------------------------------------
    def needle_insert(self, i: int, lay: _Layout) -> str:
        """Needle ``i`` with its separator, except for the last one when it ends the haystack (``post`` follows).

        The first needle at the window's end, when the window ends inside a sentence (or line), is preceded by the
        haystack's joiner, so the needle starts a sentence (line) of its own -- unless it starts with whitespace.
        """
        n = self.needles[i]
        p = lay.positions[i]
        text = n.text if i == len(self.needles) - 1 and p == lay.e else n.text + n.sep
        first_at_end = p == lay.e and (i == 0 or lay.positions[i - 1] != p)
        glue = self._glue_text(lay.glue, p)
        if first_at_end and glue and p > lay.s and not n.text[:1].isspace():
            text = glue + text
        return text

    def _pad_text(self, tail: int) -> str:
        """Whitespace the window's end may carry before ``post`` (the last knob, for windows whose end moves by
        several tokens at a time): none (0), then one or two of the unit's joiner and of the other unit's."""
        joiner = self.hay.joiner
        other = " " if joiner == "\n" else "\n"
        return ("", joiner, joiner * 2, other, other * 2, joiner + other, joiner * 2 + other)[tail]

    def _glue_text(self, glue: int, p: int) -> str:
        """What goes between the haystack's end and a needle at the end: the joiner after a cut sentence (0),
        always (1), never (2); then, for windows whose end moves by several tokens at a time (a CJK character is
        three byte-level tokens), the joiner twice (3), the other unit's joiner (4), both (5)."""
        joiner = self.hay.joiner
        other = " " if joiner == "\n" else "\n"
        return {0: "" if self.hay.is_boundary(p) else joiner, 1: joiner, 2: "", 3: joiner * 2, 4: other,
                5: joiner + other}[glue]

    def _inserts(self, lay: _Layout) -> list[tuple[int, str, list[tuple[int, int]]]]:
        """(stream position, text, template spans relative to the text) of every insertion, in order."""
        f = self.frame
        ins = [(lay.s, f.pre, f.spans("pre"))]
        ins += [(p, self.needle_insert(i, lay), []) for i, p in enumerate(lay.positions)]
        pad = self._pad_text(lay.tail)
        ins.append((lay.e, pad + f.post, [(a + len(pad), b + len(pad)) for a, b in f.spans("post")]))
        return ins

    def _splice(self, u: int, v: int, ins: list[tuple[int, str, list[tuple[int, int]]]]
                ) -> tuple[str, list[int], list[tuple[int, int]]]:
        """Stream text [u, v) with the insertions in that range; the offset of each insertion and the template
        spans, both in the spliced text."""
        text = self.st.text
        parts, where, spans, cur, n = [], [], [], u, 0
        for p, t, rel in ins:
            parts.append(text[cur:p])
            n += p - cur
            where.append(n)
            spans += [(n + a, n + b) for a, b in rel]
            parts.append(t)
            n += len(t)
            cur = p
        parts.append(text[cur:v])
        return "".join(parts), where, spans

    def estimate(self, lay: _Layout) -> int:
        """Token count of the layout's text from the cached stream plus local re-tokenization of the seams."""
        if lay in self._est:
            return self._est[lay]
        st, ins = self.st, self._inserts(lay)
        b_e = st.token_at(lay.e)
        regions: list[list] = []
        for p, t, rel in ins:
            k = st.token_at(p)
            lo = max(lay.a, k - _MARGIN)
            hi = k + _MARGIN
            u = lay.s if lo == lay.a else st.starts[lo]  # a partial first token starts at lay.s
            v = st.starts[hi] if hi < b_e else lay.e
            if regions and u <= regions[-1][1]:  # touching regions merge too (zero-width ones at an end)
                regions[-1][1] = max(regions[-1][1], v)
                regions[-1][2].append((p, t, rel))
            else:
                regions.append([u, v, [(p, t, rel)]])
        total = self.n_special + (b_e - lay.a)
        for u, v, rins in regions:
            inside = st.token_at(v) - st.token_at(u)
            spliced, _, spans = self._splice(u, v, rins)
            local = self.count(spliced, spans)
            if u == lay.s:  # the region that starts the prompt: count it as it is
                total += local - inside
            else:  # cancel what a standalone encode adds at its start (e.g. a Metaspace prefix)
                total += local - self.count(st.text[u:v])
        self._est[lay] = total
        return total

    def text(self, lay: _Layout) -> tuple[str, list[int], list[tuple[int, int]]]:
        """The prompt text, the character offset of each needle's first non-blank character, the template spans."""
        text, where, spans = self._splice(lay.s, lay.e, self._inserts(lay))
        inserts = [self.needle_insert(i, lay) for i in range(len(self.needles))]
        lead = [len(t) - len(t.lstrip()) for t in inserts]
        return text, [w + k for w, k in zip(where[1:-1], lead)], spans

    # -- search ------------------------------------------------------------------------------------------------------
    def fixed_tokens(self) -> int:
        f = self.frame
        return (self.n_special + self.count(f.pre, f.spans("pre")) + self.count(f.post, f.spans("post"))
                + sum(self.count(n.text + n.sep) for n in self.needles))

    def solve(self, target: int, h0: int, exclude: set[_Layout], extended: bool = False
              ) -> tuple[_Layout, int] | None:
        """A layout whose estimate is ``target``: Newton steps on the budget, then a small neighbourhood search."""
        h, seen = max(h0, 0), set()
        for _ in range(12):
            lay = self.layout(h)
            est = self.estimate(lay)
            if est == target and lay not in exclude:
                return lay, est
            seen.add(h)
            nh = max(h + target - est, 0)
            if nh in seen:
                break
            h = nh
        # The seams jump over the target (e.g. a token at the cut merges with ``post``, or the first haystack token
        # splits the template's last one): move the cut a little, pick the other nearest boundary for the needle,
        # cut inside the token at the window's end, glue a needle at the end differently, and only then
        # start the window later. Each knob moves a different seam, so together they reach counts that ``h`` alone
        # jumps over.
        for shift in range(4):
            for glue in (0, 1, 2) if self.at_end else (0,):
                for alt in (0, 1):
                    for cut in (0, 1, 2):
                        for dh in sorted(range(-_SEARCH, _SEARCH + 1), key=abs):
                            if h + dh < 0:
                                continue
                            lay = self.layout(h + dh, alt, cut, shift, glue)
                            if lay not in exclude and self.estimate(lay) == target:
                                return lay, target
        if not extended:
            return None
        # Windows whose end moves by several tokens at a time (a CJK character is three byte-level tokens, and no
        # cut splits a character) reach one length in three with the knobs above. Whitespace at the window's end
        # (and more ways to glue a needle there) fills the gaps. Only once every layout without them failed
        # (``extended``, see :func:`assemble`), so that prompts built before these knobs existed build as they did.
        for tail in range(_TAILS):
            for glue in (0, 1, 2, 3, 4, 5) if self.at_end else (0,):
                if tail == 0 and glue < 3:
                    continue  # tried above
                for alt in (0, 1):
                    for dh in sorted(range(-_SEARCH, _SEARCH + 1), key=abs):
                        if h + dh < 0:
                            continue
                        lay = self.layout(h + dh, alt, 0, 0, glue, tail)
                        if lay not in exclude and self.estimate(lay) == target:
                            return lay, target
        return None


def _token_containing(offsets: Sequence[tuple[int, int]], char: int) -> int:
    i = max(bisect_right(offsets, char, key=lambda o: o[0]) - 1, 0)
    while i + 1 < len(offsets) and offsets[i][1] <= char:
        i += 1
    return i


def assemble(tokenizer: Tokenizer, frame: Frame, haystack: Haystack, needles: Sequence[Needle],
             depths: Sequence[float], length: int, label: str = "task") -> Assembly:
    """Build ``frame.pre + haystack (with needles at depths) + frame.post`` at exactly ``length`` tokens.

    Every length from the minimum (:func:`minimum_length`) up builds, except possibly one or two right above it: a
    haystack of one or two tokens cannot always be made, since a needle brings its separator along. The haystack
    window starts where the filler text starts and depth-1 needles touch ``post`` (see :meth:`_Builder.layout`).
    Raises LengthError when ``length`` is below the
    minimum, or when no layout tokenizes to exactly ``length`` (never truncates).
    """
    if len(needles) != len(depths) or not needles:
        raise ValueError("one depth per needle, at least one needle")
    if any(not 0.0 <= d <= 1.0 for d in depths) or list(depths) != sorted(depths):
        raise ValueError(f"needle depths must be non-decreasing fractions in 0..1, got {list(depths)}")
    b = _Builder(tokenizer, frame, haystack, needles, depths)
    where = f"{label} at {length} tokens with tokenizer {tokenizer.name}"
    if length < b.estimate(b.layout(0)):
        actual = _verified_minimum(b)
        if length < actual:
            raise LengthError(f"{where}: too short; the template and needle alone need {actual} tokens")
    # Keyed without the frame text: niah questions name a fresh key per sample, the seams stay alike.
    key = (tokenizer.fingerprint(), frame.mode, haystack.fingerprint, len(needles), b.at_end)
    if key not in _RESIDUAL:
        _RESIDUAL[key] = _calibrate(b)
    exclude: set[_Layout] = set()
    for extended in (False, True):
        asm = _search(b, tokenizer, frame, length, key, exclude, extended)
        if asm is not None:
            return asm
    minimum = _verified_minimum(b)
    hint = f"the minimum is {minimum}; " if length < minimum + 8 else ""
    raise LengthError(f"{where}: no haystack cut tokenizes to exactly {length} tokens "
                      f"(tried {len(exclude)} layouts); {hint}try a length a few tokens away")


def _search(b: _Builder, tokenizer: Tokenizer, frame: Frame, length: int, key: tuple, exclude: set[_Layout],
            extended: bool) -> Assembly | None:
    """Up to :data:`_MAX_VERIFY` layouts whose estimate is ``length``, each verified by a full tokenization; the
    first exact one as an :class:`Assembly`, or None."""
    residual = _RESIDUAL[key]
    h0 = length - b.fixed_tokens()
    for attempt in range(1, _MAX_VERIFY + 1):
        got = b.solve(length - residual, h0, exclude, extended)
        if got is None and residual:
            got = b.solve(length, h0, exclude, extended)
        if got is None:
            break
        lay, est = got
        exclude.add(lay)
        text, where_needles, spans = b.text(lay)
        ids, offsets = tokenizer.encode_with_offsets(text, frame.add_special_tokens, spans)
        if len(ids) == length:
            _RESIDUAL[key] = len(ids) - est
            asm = _finish(text, ids, offsets, frame, b, lay, where_needles, attempt)
            asm.special_spans = spans
            return asm
        residual = len(ids) - est
        h0 = b.st.token_at(lay.e) - lay.a
    return None


def minimum_length(tokenizer: Tokenizer, frame: Frame, haystack: Haystack, needles: Sequence[Needle],
                   depths: Sequence[float]) -> int:
    """Tokens of the prompt with an empty haystack: the shortest length these needles can be built at."""
    return _verified_minimum(_Builder(tokenizer, frame, haystack, needles, depths))


def _verified_minimum(b: _Builder) -> int:
    text, _, spans = b.text(b.layout(0))
    return len(b.encode(text, spans))


def _calibrate(b: _Builder) -> int:
    """Seam correction learnt on a short build of this frame: verified length minus estimated length."""
    lay = b.layout(256)
    text, _, spans = b.text(lay)
    return len(b.encode(text, spans)) - b.estimate(lay)


def _finish(text: str, ids: list[int], offsets: list[tuple[int, int]], frame: Frame, b: _Builder, lay: _Layout,
            where_needles: list[int], attempt: int) -> Assembly:
    """Needle token indices and the actual depth, read from the verified offsets."""
    idx = [_token_containing(offsets, c) for c in where_needles]
    hs = _token_containing(offsets, len(frame.pre))
    ctx_end = len(text) - len(frame.post)
    he = _token_containing(offsets, ctx_end) if ctx_end < len(text) else len(ids)
    needle_toks = 0
    for i, c in enumerate(where_needles):
        end = c + len(b.needle_insert(i, lay).lstrip())  # its separator is no haystack either
        needle_toks += (_token_containing(offsets, end) if end < len(text) else len(ids)) - _token_containing(
            offsets, c)
    hay_toks = max(he - hs - needle_toks, 0)
    first = min(idx)
    depth_actual = None if hay_toks == 0 else min(max((first - hs) / hay_toks, 0.0), 1.0)
    return Assembly(text, list(ids), idx, where_needles, hs, hay_toks, depth_actual, (lay.s, lay.e),
                    list(lay.positions), attempt)
