"""The one redaction of secrets: the logged config, MLflow params and tags, the report, error texts.

Two rules, applied together to any value (mappings and lists recursively):

1. By key. A key is secret when its words (split at dots, dashes, underscores and camelCase) hold a
   credential word (password, secret, token, credential, jaas, signature, ...) or a qualified key
   (access key, secret key, private key, account key, api key, ...). `key` alone is not secret:
   `partition_key`, `sort_key` and `key_env` are names, not keys. A key whose last word says it only
   points at a secret (`..._env`, `..._file`, `..._path`, `..._scope`, `..._provider`) is not secret
   either, nor are the few segspark keys that name where a secret lives (REFERENCE_KEYS). Nested keys
   are judged on their full dotted path, so `spark.conf` entries such as
   `fs.azure.account.key.<account>.dfs.core.windows.net` or `fs.s3a.secret.key` are caught whole.
   `kafka.sasl.jaas.config` is redacted whole: besides `password="..."` its `username` is often an
   API key (Confluent Cloud), so no part of it is safe to show.
2. By shape, in every text (values of any key, and free text such as error messages): URL user info
   (`https://user:pass@host`), `name=value` parameters with a secret name (query strings, JDBC URLs,
   Spark Connect's `sc://host/;token=...`, connection strings, JAAS text), quoted JSON pairs,
   `Authorization:` headers and `Bearer` tokens, PEM private keys and AWS access key ids.

Booleans are never redacted (a flag is no secret) and None stays None (it shows no secret is set).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

# Words that make a key secret on their own.
SECRET_WORDS = frozenset({
    "password", "passwd", "pwd", "pass", "passphrase", "secret", "secrets", "token", "tokens", "credential",
    "credentials", "creds", "apikey", "accesskey", "secretkey", "privatekey", "jaas", "signature", "sig", "sas",
    "authorization", "bearer", "cookie",
})
# `<qualifier> key` is secret (`access key`, `account key`); `key` after anything else is a name.
KEY_QUALIFIERS = frozenset({
    "access", "secret", "private", "account", "api", "signing", "encryption", "master", "client", "shared",
    "sas", "ssh", "hmac", "session", "auth", "storage", "keystore", "pseudonym",
})
# A last word that makes the key a pointer to a secret (its location or kind), not the secret itself.
REFERENCE_WORDS = frozenset({"env", "scope", "path", "file", "dir", "provider", "class", "type", "mechanism",
                             "enabled", "algorithm", "name"})
# segspark's own keys that name where a secret lives (a Databricks secret scope's key name).
REFERENCE_KEYS = frozenset({"privacy.secret_key"})
# Query or connection-string parameters that are secret although their name alone would not say so.
SECRET_PARAMS = frozenset({"key", "sig", "code"})
# Object-store schemes whose user-info part is a container name, not a credential.
_CONTAINER_SCHEMES = frozenset({"abfs", "abfss", "wasb", "wasbs"})

_PARTS = re.compile(r"[^A-Za-z0-9]+")
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")

_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)", re.S)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<info>[^/?#@\s\"']+)@")
_ORACLE_THIN = re.compile(r"(?i)(?<=:thin:)[^@/\s:]+/[^@\s]+@")
_HEADER = re.compile(r"(?i)\b(?P<name>authorization|proxy-authorization|x-api-key|api-key|cookie)(?P<sep>\s*:\s*)"
                     r"(?P<value>[^\r\n]+)")
_BEARER = re.compile(r"(?i)\b(?P<name>bearer)(?P<sep>\s+)(?P<value>[A-Za-z0-9\-._~+/]{8,}=*)")
_PAIR = re.compile(r"(?<![\w.\-])(?P<name>[A-Za-z_][\w.\-]*)(?P<sep>\s*=\s*)"
                   r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s;&,\"')\]}]*)")
_JSON_PAIR = re.compile(r"\"(?P<name>[^\"\\]{1,100})\"(?P<sep>\s*:\s*)(?P<value>\"(?:[^\"\\]|\\.)*\")")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


def words(name: str) -> list[str]:
    """`fs.s3a.secretKey` -> [fs, s, 3, a, secret, key]."""
    return [w.lower() for part in _PARTS.split(name) for w in _WORDS.findall(part)]


def is_secret_key(name: str) -> bool:
    """Whether a (dotted) key holds a secret by the rule of the module docstring."""
    if name in REFERENCE_KEYS:
        return False
    found = words(name)
    if not found or found[-1] in REFERENCE_WORDS:
        return False
    if any(w in SECRET_WORDS for w in found):
        return True
    return any(q in KEY_QUALIFIERS and k in ("key", "keys") for q, k in zip(found, found[1:], strict=False))


def redact(value: Any, path: str = "") -> Any:
    """`value` with every secret replaced by '***' (mappings and lists recursively). `path`: the
    dotted key `value` sits under (the key rule judges the full path)."""
    if isinstance(value, Mapping):
        return {k: redact(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, path) for v in value]
    if value is None or isinstance(value, bool):
        return value
    if path and is_secret_key(path) and value != "":
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    """Free text with the secret shapes of rule 2 masked (URLs, parameters, headers, keys)."""
    if not text:
        return text
    text = _PEM.sub(MASK, text)
    text = _USERINFO.sub(_userinfo, text)
    text = _ORACLE_THIN.sub(MASK + "@", text)
    text = _HEADER.sub(_masked_value, text)
    text = _BEARER.sub(_masked_value, text)
    text = _PAIR.sub(_pair, text)
    text = _JSON_PAIR.sub(_json_pair, text)
    return _AWS_KEY_ID.sub(MASK, text)


def _userinfo(match: re.Match) -> str:
    scheme, info = match.group("scheme"), match.group("info")
    if scheme.lower() in _CONTAINER_SCHEMES and ":" not in info:
        return match.group(0)  # abfss://container@account...: the container, not a credential
    return f"{scheme}://{MASK}@"


def _masked_value(match: re.Match) -> str:
    return f"{match.group('name')}{match.group('sep')}{_mask_keeping_quotes(match.group('value'))}"


def _pair(match: re.Match) -> str:
    name = match.group("name")
    if is_secret_key(name) or name.lower() in SECRET_PARAMS:
        return _masked_value(match)
    return match.group(0)


def _json_pair(match: re.Match) -> str:
    if is_secret_key(match.group("name")):
        return f'"{match.group("name")}"{match.group("sep")}"{MASK}"'
    return match.group(0)


def _mask_keeping_quotes(value: str) -> str:
    if not value:
        return value
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return f"{value[0]}{MASK}{value[0]}"
    return MASK


__all__ = ["MASK", "is_secret_key", "redact", "redact_text", "words"]
