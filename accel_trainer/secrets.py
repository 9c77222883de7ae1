"""The one place where credentials are taken out of what a run writes or prints.

Anything that can hold a credential goes through here before it reaches a file of the run (the lock,
``run_config.json``, ``exit_status.json``), a log line, a tracker or an error message: storage
options (``{"key": ..., "secret": ...}``), URLs with ``user:password@`` or secret query parameters,
``--flag value`` pairs whose flag names a secret, ``NAME=value`` environment assignments, and the
token formats of the common providers. It sits at the bottom of the house: it imports nothing.
"""

from __future__ import annotations

import json
import re

MASK = "***"
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "session", "auth", "signature")
# Whole tokens that are secrets whatever they are next to (providers' documented prefixes).
TOKEN_PATTERNS = (r"hf_[A-Za-z0-9]{20,}", r"(?:AKIA|ASIA)[A-Z0-9]{16}", r"sk-[A-Za-z0-9_-]{20,}",
                  r"gh[pousr]_[A-Za-z0-9]{20,}", r"xox[abpr]-[A-Za-z0-9-]{10,}")
_TOKENS = re.compile("|".join(TOKEN_PATTERNS))
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# name=value in URL queries and plain text, "name": "value" in JSON text: masked when the name is a secret's.
_QUERY_PAIR = re.compile(r"(?P<name>[?&][^=&\s]+=)(?P<value>[^&\s]+)")
_JSON_PAIR = re.compile(r'(?P<name>"(?P<key>[^"]+)"\s*:\s*)(?P<value>"(?:[^"\\]|\\.)*")')
_PLAIN_PAIR = re.compile(r"(?P<name>\b(?P<key>[A-Za-z][A-Za-z0-9_.-]*)\s*[=:]\s*)(?P<value>[^\s,;'\"}]+)")
_WORDS = set(SECRET_WORDS) | {"credentials", "apikey", "api_key"}
# What help texts and errors write where a value goes (``expected key=value``): words, not secrets.
PLACEHOLDERS = {"value", "values", "val", "...", "<value>", "<secret>", "<key>", "<token>", "x"}


def is_secret_name(name: str) -> bool:
    """Whether a key, flag or variable name says it holds a credential (``aws_secret_access_key``,
    ``--hub_token``, ``HF_TOKEN``, ``password``, ``X-Amz-Signature``), by its words: ``--tokenizer_name``
    and ``--keep_every_n_steps`` do not."""
    parts = [p for p in re.split(r"[^a-z0-9]+", name.lower()) if p]
    return any(p in _WORDS or p.endswith(("key", "token", "secret", "password")) for p in parts)


def redact_mapping(value):
    """A copy of ``value`` (dicts and lists, any depth) with every credential-named key's value masked."""
    if isinstance(value, dict):
        return {k: MASK if isinstance(k, str) and is_secret_name(k) and v not in (None, "") else redact_mapping(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact_mapping(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def _masked_if_secret(match, key_group: str = "name") -> str:
    key = match.group(key_group).strip("?&=\"': ")
    value = match.group("value").strip('"')
    if not is_secret_name(key) or value in ("", MASK) or value.lower() in PLACEHOLDERS:
        return match.group(0)
    value = f'"{MASK}"' if match.group("value").startswith('"') else MASK
    return match.group("name") + value


def redact_url(url: str) -> str:
    """``s3://user:pass@bucket/x?X-Amz-Signature=...`` -> ``s3://***@bucket/x?X-Amz-Signature=***``."""
    url = _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", url)
    return _QUERY_PAIR.sub(_masked_if_secret, url)


def redact_text(text: str) -> str:
    """Any text (an error message, a command line, a log line) with the credentials it holds masked."""
    if not text:
        return text
    text = redact_url(text)
    text = _JSON_PAIR.sub(lambda m: _masked_if_secret(m, "key"), text)
    text = _PLAIN_PAIR.sub(lambda m: _masked_if_secret(m, "key"), text)
    return _TOKENS.sub(MASK, text)


def redact_argv(argv: list[str]) -> list[str]:
    """A command line fit to record: the value after a credential-named flag, a JSON argument's
    credential keys (``--storage_options``), ``--flag=value`` forms and anything :func:`redact_text`
    finds are masked."""
    out, mask_next = [], False
    for arg in argv:
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            out.append(f"{flag}={MASK}" if is_secret_name(flag) else f"{flag}={_redact_value(value)}")
            continue
        if arg.startswith("--") and is_secret_name(arg):
            out.append(arg)
            mask_next = True
            continue
        out.append(_redact_value(arg))
    return out


def _redact_value(value: str) -> str:
    stripped = value.strip()
    if stripped.startswith("{"):
        try:
            return json.dumps(redact_mapping(json.loads(stripped)))
        except ValueError:
            pass  # not JSON after all: the text rules below apply
    return redact_text(value)
