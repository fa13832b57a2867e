"""Secrets never written: option values under secret-looking keys, and passwords in URLs, are masked as ``***``
wherever evalctx writes a command line or options (manifest.json, report.html, report.md).

A key is secret when it ends in api_key, access_key, secret_key, private_key, apikey, token, secret, password,
passwd, auth, authorization, credential(s) or bearer as a whole word (``api_key``, ``hf_token``, ``OPENAI_API_KEY``,
``client_secret``); ``max_new_tokens``, ``tokenizer`` or ``key_digits`` are not. Only the value is masked, so the record still shows that a key was given.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Sequence

MASK = "***"
_SECRET_KEY = re.compile(r"(?:^|[_\-.])(?:(?:api|access|secret|private)[_-]?key|apikey|token|secret|password|passwd|"
                         r"auth|authorization|credentials?|bearer)$", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*:)[^/\s@]+@")
_BEARER = re.compile(r"(\bBearer\s+)\S+", re.IGNORECASE)


_NOT_SECRET = re.compile(r"(?:per|bos|eos|pad|unk|sep|cls)[_-]token$", re.IGNORECASE)
"""Rates and special-token names that end in ``token`` but hold no secret (``seconds_per_token``, ``eos_token``)."""


def is_secret_key(key: str) -> bool:
    k = str(key).strip().lstrip("-")
    return bool(_SECRET_KEY.search(k)) and not _NOT_SECRET.search(k)


_KNOWN: set[str] = set()
"""Secret values this process was given (an API key from an option or the environment): masked wherever they
appear, a server's error message that quotes the key included."""


def remember(value: Any) -> None:
    """Mask ``value`` in every text from now on (values under 6 characters are too likely to be ordinary words)."""
    if isinstance(value, str) and len(value.strip()) >= 6:
        _KNOWN.add(value.strip())


def mask_text(text: str) -> str:
    """A password in a URL (``https://user:PASS@host``), a bearer token in a header line, and every secret value
    :func:`remember`-ed."""
    out = _BEARER.sub(r"\1" + MASK, _URL_PASSWORD.sub(r"\1" + MASK + "@", text))
    for secret in _KNOWN:
        if secret in out:
            out = out.replace(secret, MASK)
    return out


def mask(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, strings, scalars) with the values of secret keys and URL passwords masked."""
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_key(k) and v not in (None, "") else mask(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(mask(v) for v in obj)
    if isinstance(obj, str):
        return mask_text(obj)
    return obj


def _mask_word(word: str) -> str:
    key, sep, value = word.partition("=")
    if sep and is_secret_key(key):
        return f"{key}={MASK}"
    if sep and key.startswith("--"):  # --backend-opt=api_key=...
        return f"{key}={_mask_word(value)}"
    return mask_text(word)


def mask_argv(argv: Sequence[str]) -> list[str]:
    """Command-line words with secrets masked: ``KEY=VALUE`` words (``--backend-opt api_key=...``), ``--KEY=VALUE``
    and ``--KEY VALUE`` for a secret KEY, and URL passwords."""
    out: list[str] = []
    hide_next = False
    for word in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
        elif word.startswith("--") and "=" not in word and is_secret_key(word):
            out.append(word)
            hide_next = True
        else:
            out.append(_mask_word(word))
    return out


def mask_command(command: str) -> str:
    """A shell command line (as the manifest records it) with secrets masked."""
    try:
        return shlex.join(mask_argv(shlex.split(command)))
    except ValueError:  # unbalanced quotes: mask word by word on whitespace
        return " ".join(mask_argv(command.split()))


def mask_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest (or anything with a ``command`` line) with its options, URLs and command line masked."""
    out = mask(manifest)
    if isinstance(out.get("command"), str):
        out["command"] = mask_command(out["command"])
    return out
