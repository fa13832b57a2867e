"""What a chat template puts around the user's text, as the run's identity and manifest record it.

A chat prompt is the tokenizer's template over one user turn. Some templates put more than markers there: the date
(Llama 3.1-3.3's system header says "Today Date: 07 Dec 2026" through ``strftime_now``), a default system turn when
none is given (Qwen2.5's "You are Qwen, created by Alibaba Cloud..."). A run pins the date when it is created
(:func:`pinned_date`) and passes it to the template, so a run resumed another day builds the same prompts; the
manifest records the template's hash, whether it writes the date, the pinned date, the default system turn and
the whole frame around the user text, and ``compare`` reads them back.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from typing import Any

from evalctx.errors import UsageError

USER = "{user}"
SYSTEM = "{system}"
_PROBE_DATES = (_dt.date(2001, 2, 3), _dt.date(2002, 11, 27))


def today() -> _dt.date:
    """Today in UTC (one clock for every rank and host)."""
    return _dt.datetime.now(_dt.timezone.utc).date()


def parse_date(text: str) -> _dt.date:
    """``YYYY-MM-DD`` (or ``today``) as a date; UsageError otherwise."""
    if text == "today":
        return today()
    try:
        return _dt.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--chat-date {text!r}: give a date as YYYY-MM-DD (or 'today')") from None


def pinned_date(manifest: dict[str, Any] | None, given: _dt.date | None) -> _dt.date:
    """The day a run's chat templates see: ``given`` (--chat-date), else the one the run was created with (its
    manifest), else today (UTC)."""
    if given is not None:
        return given
    recorded = ((manifest or {}).get("chat_template") or {}).get("date")
    if isinstance(recorded, str):
        try:
            return _dt.date.fromisoformat(recorded)
        except ValueError:
            pass
    return today()


_USES_DATE: dict[str, bool] = {}


def uses_date(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template writes the date (rendered on two days, compared); cached per
    tokenizer fingerprint."""
    key = tokenizer.fingerprint()
    if key not in _USES_DATE:
        user = [{"role": "user", "content": USER}]
        try:
            _USES_DATE[key] = tokenizer.has_chat_template() and \
                len({_render(tokenizer, user, d) for d in _PROBE_DATES}) > 1
        except Exception:  # a template that fails to render fails where prompts are built, with the reason
            _USES_DATE[key] = False
    return _USES_DATE[key]


def date_key(tokenizer: Any) -> str | None:
    """The day a chat prompt of this tokenizer is rendered for, when its template writes the date (so two days'
    prompts never share a sample id); None otherwise."""
    if not uses_date(tokenizer):
        return None
    day = tokenizer.chat_date or today()
    return day.isoformat()


def _render(tokenizer: Any, messages: list[dict[str, str]], day: _dt.date) -> str:
    saved = tokenizer.chat_date
    tokenizer.chat_date = day
    try:
        return tokenizer.apply_chat_template(messages)
    finally:
        tokenizer.chat_date = saved


def describe(tokenizer: Any) -> dict[str, Any] | None:
    """The template's facts for the manifest (None when the tokenizer has no template):

    ``sha1`` of the rendered frame at a fixed probe date (the template's identity, whatever the day), ``uses_date``,
    ``date`` (the pinned day, when the template writes one), ``frame`` (the rendering of one user turn ``{user}``
    with the generation prompt, at the pinned date), ``default_system_turn`` (the text the template puts where a
    system message would go when none is given, or None)."""
    if not tokenizer.has_chat_template():
        return None
    user = [{"role": "user", "content": USER}]
    try:
        probes = [_render(tokenizer, user, d) for d in _PROBE_DATES]
    except Exception as exc:  # Jinja errors come in many types; placement reports them to the user
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    day = tokenizer.chat_date
    writes_date = probes[0] != probes[1]
    frame = _render(tokenizer, user, day) if day is not None else probes[0]
    return {
        "sha1": hashlib.sha1(probes[0].encode()).hexdigest()[:16],
        "uses_date": writes_date,
        "date": day.isoformat() if writes_date and day is not None else None,
        "frame": frame,
        "default_system_turn": _default_system_turn(tokenizer, probes[0], _PROBE_DATES[0]),
    }


def _default_system_turn(tokenizer: Any, plain: str, day: _dt.date) -> str | None:
    """What the template writes in the system slot when no system message is given: the text between the system
    slot's opening and closing markers (learnt from a rendering with a system message ``{system}``), or None when
    the template has no system slot or leaves it out."""
    try:
        with_system = _render(tokenizer, [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": USER}], day)
    except Exception:
        return None  # a template that refuses system messages has no system slot
    if with_system.count(SYSTEM) != 1 or with_system.count(USER) != 1:
        return None
    before, after = with_system.split(SYSTEM)
    closing = after[:after.index(USER)]
    if not plain.startswith(before) or not closing:
        return None
    rest = plain[len(before):]
    end = rest.find(closing)
    return rest[:end] if end > 0 else None
