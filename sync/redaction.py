"""Secrets out of every text we store or print.

One ``Redactor`` is built from the config (write keys, webhook secrets, credential headers,
URL userinfo, values read from the environment into secret-like keys) and installed for the
process. Every boundary uses that same object: the log filter, the state DB's free-text
columns (``models.RedactedText``) and the CLI's output. Beyond the known values it hides the
userinfo of any URL it sees, so a secret it was never told about still does not travel in one.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import json
import re
import string
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pydantic import SecretStr

REDACTED = "***"
# Shorter values would mangle ordinary words in every message and protect nothing.
MIN_SECRET_LENGTH = 3
# Config keys whose values are credentials (the trait `key` of an audience is not one).
_SECRET_KEY = re.compile(r"(?i)secret|token|passw|pwd|credential|write_key|api_?key|private")
# Header names that carry credentials; other headers (`X-Team = "growth"`) are not hidden
# unless their value came from the environment.
_SECRET_HEADER = re.compile(r"(?i)auth|token|key|secret|signature|passw|cookie|session|credential")
# Query parameters of a URL that carry credentials (`?access_token=…`, a SAS `sig=`); other
# parameters (`?tenant=acme`) are shown unless the whole URL came from the environment.
# Matched against the name's words (`X-Amz-Signature`, `api_key`, `accessToken`), so that
# `keyword` or `monkey` are not credentials.
_SECRET_PARAM = re.compile(
    r"(?i)^(auth|authorization|token|key|apikey|secret|signature|sig|password|passwd|pwd|"
    r"session|credential|credentials|code)$"
)
# A query value shorter than this is no credential worth hiding everywhere (`auth=none`).
MIN_PARAM_SECRET_LENGTH = 6
# Values that are credentials whole by where they sit: an alert's URL (a Slack incoming
# webhook's token is its path).
_SECRET_PATH = re.compile(r"^alerts\..+\.url$")
# Keys whose value is a URL: a value read into one from the environment is a secret whole
# (webhook URLs often carry their token in the path).
_URL_KEYS = frozenset({"url", "endpoint"})
# Config keys holding SQL a source runs: a value read into one from a variable named like a
# credential (a pgcrypto key, a tenant token) is a secret, since a source's error may quote
# the SQL; `${SCHEMA}` or `${TABLE}` are not (their values are ordinary words everywhere).
_SQL_KEYS = frozenset({"query", "now_query"})
# Words of a variable's name (split at anything but letters and digits) that make it a
# credential; a word ending in one of _SECRET_ENDINGS too (PGKEY, APITOKEN), but not these
# ordinary words, and not a key that a word of _KEY_CONTEXTS says is a column (SORT_KEY).
_SECRET_WORDS = frozenset(
    [
        "secret",
        "token",
        "pass",
        "passwd",
        "password",
        "passphrase",
        "pw",
        "pwd",
        "credential",
        "private",
        "auth",
        "salt",
        "pepper",
        "jwt",
        "bearer",
        "sig",
        "signature",
        "signing",
        "hmac",
        "cert",
        "key",
        "apikey",
    ]
)
_SECRET_ENDINGS = ("key", "token", "secret", "password", "passphrase", "pwd", "pass", "pw")
_ORDINARY_WORDS = frozenset(
    ["monkey", "turkey", "hockey", "donkey", "jockey", "whiskey", "bypass", "compass"]
)
_KEY_CONTEXTS = frozenset(
    ["sort", "partition", "primary", "foreign", "id", "join", "group", "shard", "trait"]
)
# A text cut short (MariaDB quotes 80 characters near a syntax error) ends with one of these.
_CUT = re.compile(r"\.\.\.|…")
# The shortest part of a secret hidden where an excerpt cuts it (shorter parts are too common
# in ordinary text: "https..." before a cut, with a URL as a secret).
MIN_CUT_PREFIX = 6
# Quote characters: errors quote what they could not parse or convert (MariaDB's near '…',
# PostgreSQL's at or near "…" and invalid input syntax …: "…", SQLite's unrecognized token:
# "…", MySQL's `…`), and a quote character inside a secret splits it into such runs.
_Q = ("'", '"', "`")
# A quote or a cut mark: where a text may cut a secret short.
_MARK = re.compile(r"['\"`]|\.\.\.|…")
# Texts holding none of these need no look for cut or quoted parts of secrets.
_MARKS = ("...", "…", *_Q)
# Bytes a database shows escaped (MariaDB's "Invalid utf8mb4 character string: 'Kq7x\xF0\x9F…'"
# writes every byte outside printable ASCII so; Python's bytes in lower case).
_ESCAPED_BYTES = re.compile(r"(?:\\x[0-9A-Fa-f]{2})+")
# scheme://userinfo@ where the userinfo runs to the LAST "@" before the authority ends: a
# password with an unencoded "@" must not leak its tail.
_URL_USERINFO = re.compile(
    r"(?P<scheme>\b(?P<name>[A-Za-z][A-Za-z0-9+.-]*)://)(?P<userinfo>[^\s/?#\"'<>]*)@"
)
# Schemes whose user name is a role rather than a credential (database URLs).
_HTTP_SCHEMES = frozenset({"http", "https", "ws", "wss", "ftp", "ftps"})


def _hide_userinfo(match: re.Match[str]) -> str:
    scheme, userinfo = match.group("scheme"), match.group("userinfo")
    if match.group("name").lower() in _HTTP_SCHEMES:
        return f"{scheme}{REDACTED}@"  # tokens travel as HTTP user names
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}{user}:{REDACTED}@" if colon else match.group(0)


# PostgreSQL folds an unquoted identifier's ASCII letters to lower case, and quotes it so:
# column "kq7xzp2m" (or members.kq7xzp2m) does not exist.
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _forms(secret: str) -> Iterator[str]:
    """The secret as it may appear in a text: raw, JSON-escaped, percent-encoded or decoded;
    as a database quotes the value of a literal holding it (a doubled quote undoubled:
    PostgreSQL's invalid input syntax for type integer: "Kq7x'Zp2m"), and with each 4-byte
    character as "?" (MariaDB's near '…' excerpt is in a character set without them); with
    its ASCII letters in lower case (PostgreSQL folds an unquoted identifier). Bytes a
    database shows as ``\\xNN`` escapes are decoded in the text instead (``_hide_escaped``)."""
    yield secret
    yield json.dumps(secret)[1:-1]
    yield quote(secret, safe="")
    yield unquote(secret)
    single, double = secret.replace("''", "'"), secret.replace('""', '"')
    yield from {single, double, single.replace('""', '"')} - {secret}
    if any(ord(c) > 0xFFFF for c in secret):
        yield "".join("?" if ord(c) > 0xFFFF else c for c in secret)
    folded = secret.translate(_ASCII_LOWER)
    if len(secret) >= MIN_CUT_PREFIX and folded != secret:
        yield folded


def _shared_start(text: str, secret: str) -> int:
    """The length of the longest start of ``secret`` (at least ``MIN_CUT_PREFIX``
    characters, shorter than all of it) that ``text`` ends with; 0 if none."""
    window = text[-(len(secret) - 1) :]
    head = secret[:MIN_CUT_PREFIX]
    at = window.find(head)
    while at >= 0:
        if secret.startswith(window[at:]):
            return len(window) - at
        at = window.find(head, at + 1)
    return 0


def _shared_part(text: str, secret: str) -> int:
    """The length of the longest part of ``secret`` (at least ``MIN_CUT_PREFIX`` characters)
    that ``text`` starts with and that runs to the secret's end (an excerpt starting inside
    it) or to where ``text`` cuts or quotes it (``_ends_run``: an excerpt cut on both sides
    inside it, a token a quote character in the secret ended); 0 if none."""
    head = text[:MIN_CUT_PREFIX]
    if len(head) < MIN_CUT_PREFIX:
        return 0
    best = 0
    at = secret.find(head)
    while at >= 0:
        run = MIN_CUT_PREFIX
        limit = min(len(text), len(secret) - at)
        while run < limit and text[run] == secret[at + run]:
            run += 1
        if at and at + run == len(secret):
            best = max(best, run)
        while run >= MIN_CUT_PREFIX and not _ends_run(text, run):
            run -= 1
        best = max(best, run if run >= MIN_CUT_PREFIX else 0)
        at = secret.find(head, at + 1)
    return best


def _ends_run(text: str, end: int) -> bool:
    """Whether a quoted or cut run of ``text`` may end at ``end``: before its first closing
    quote (not after a quote: a secret's quote characters show as the quotes they became),
    a cut mark, the end of a line or of ``text``."""
    if text[end - 1] in _Q:
        return False
    return end == len(text) or text[end] in _Q or text[end] == "\n" or bool(_CUT.match(text, end))


class Redactor:
    """Replaces known secrets, and any URL userinfo, with ``***``. Immutable, thread-safe."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: frozenset[str] = frozenset(s for s in secrets if s)
        known = {f for s in self.secrets for f in _forms(s) if len(f) >= MIN_SECRET_LENGTH}
        # Longest first, so a secret containing another is replaced whole.
        ordered = sorted(known, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._cuttable = [f for f in ordered if len(f) > MIN_CUT_PREFIX]
        self._longest = max((len(f) for f in ordered), default=0)
        # Secrets a database may show as byte escapes: any character outside printable ASCII.
        self._escapable = any(c < " " or c > "~" for s in self.secrets for c in s)
        self._index: dict[str, set[str]] | None = None  # built when a text first needs it

    @property
    def _parts(self) -> dict[str, set[str]]:
        """Every part of MIN_CUT_PREFIX characters of a secret an excerpt may cut -> the
        secrets holding it: where a cut ends (or a quote starts) inside a secret, the
        characters next to it are such a part, so one lookup finds the candidates. Built on
        first use (the first text with a quote or a cut mark), not with every redactor
        ``install`` makes; two threads building it at once build the same index."""
        if self._index is None:
            index: dict[str, set[str]] = {}
            for form in self._cuttable:
                for i in range(len(form) - MIN_CUT_PREFIX + 1):
                    index.setdefault(form[i : i + MIN_CUT_PREFIX], set()).add(form)
            self._index = index
        return self._index

    def redact(self, text: str) -> str:
        """``text`` with every secret and URL userinfo replaced."""
        if self._escapable and "\\x" in text:
            text = self._hide_escaped(text)
        if self._pattern is not None:
            text = self._pattern.sub(REDACTED, text)
        if self._cuttable and any(mark in text for mark in _MARKS):
            text = _replace(text, self._part_spans(text))
        return _URL_USERINFO.sub(_hide_userinfo, text)

    def _part_spans(self, text: str) -> list[tuple[int, int]]:
        """Where ``text`` shows parts of secrets that a cut or a quote split off: the start of
        one where a cut mark or a quote ends it (MariaDB quotes 80 characters of SQL and marks
        the cut: "…, 'Kq7xZp2m..."; PostgreSQL: invalid input syntax for type integer:
        "Kq7xZp2m" of a secret holding "','"), the end of one where a quote or a cut mark
        starts inside it (after a quote character the secret holds: MariaDB's ``near
        '-Tail'``, PostgreSQL's "LINE 1: ...mRwLm9Tt' AND", an unterminated string running on
        into the SQL: ``at or near "'Zp2mRwLm9Tt AND …"``), and a quoted run that is a part of
        one (``near ""cdEFGhij""`` quotes a quoted identifier). Each looks at most a secret's
        length around its mark (so a secret holding "..." is seen whole); a mark whose next or
        previous characters are no part of a secret costs one lookup."""
        spans: list[tuple[int, int]] = []
        parts = self._parts
        for mark in _MARK.finditer(text):
            at, after = mark.span()
            quote = after - at == 1 and text[at] != "…"
            # A quoted run starts after its last opening quote and ends at its first closing
            # one: `""cdEFGhij""` quotes the identifier cdEFGhij (a secret's quote characters
            # show as the quotes they became).
            if not (quote and text[at - 1 : at] in _Q):
                candidates = parts.get(text[max(0, at - MIN_CUT_PREFIX) : at])
                if candidates:
                    before = text[max(0, at - self._longest) : at]
                    longest = max(_shared_start(before, form) for form in candidates)
                    if longest:
                        spans.append((at - longest, at))
            if not (quote and text[after : after + 1] in _Q):
                candidates = parts.get(text[after : after + MIN_CUT_PREFIX])
                if candidates:
                    rest = text[after : after + self._longest + 1]
                    longest = max(_shared_part(rest, form) for form in candidates)
                    if longest:
                        spans.append((after, after + longest))
        return spans

    def _hide_escaped(self, text: str) -> str:
        """``text`` with the secrets (and cut or quoted parts of them) that it shows as byte
        escapes hidden: MariaDB's error 1300 shows a value's bytes outside printable ASCII as
        ``\\xF0\\x9F…`` ("Invalid utf8mb4 character string: 'Kq7x\\xF0\\x9F\\x98\\x80Zp2m'", cut
        with "..." after 64 bytes, up to a quote in it). The escapes are decoded (bytes a cut
        left without the rest of their character are dropped), the decoded text is looked at
        like any other, and what it hides is hidden in ``text``, escapes and all."""
        decoded: list[str] = []
        origin: list[int] = []  # the index in ``text`` of each decoded character
        done = 0
        for run in _ESCAPED_BYTES.finditer(text):
            decoded.append(text[done : run.start()])
            origin.extend(range(done, run.start()))
            data = bytes.fromhex(run.group().replace("\\x", ""))
            # final=False: a trailing incomplete character (cut) is left out.
            chars = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(data)
            at = run.start()
            for char in chars:
                origin.append(at)
                at += 4 * len(char.encode("utf-8", "surrogateescape"))
            decoded.append(chars)
            done = run.end()
        if not done:
            return text
        decoded.append(text[done:])
        origin.extend(range(done, len(text) + 1))
        plain = "".join(decoded)
        spans = [m.span() for m in self._pattern.finditer(plain)] if self._pattern else []
        if self._cuttable:
            spans += self._part_spans(plain)
        return _replace(text, [(origin[start], origin[end]) for start, end in spans])

    def redact_tree(self, value: Any) -> Any:
        """A copy of a JSON-like value (dicts, lists, strings) with every string redacted."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Mapping):
            return {k: self.redact_tree(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact_tree(v) for v in value]
        return value

    def union(self, other: Redactor) -> Redactor:
        """A redactor that hides what either hides."""
        return Redactor(self.secrets | other.secrets)


def _replace(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with each span replaced by ``REDACTED``, overlapping or touching spans as one
    (the parts on either side of a quote in a secret)."""
    if not spans:
        return text
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    pieces: list[str] = []
    done = 0
    for start, end in merged:
        pieces.append(text[done:start] + REDACTED)
        done = end
    pieces.append(text[done:])
    return "".join(pieces)


_installed = Redactor()
_install_lock = threading.Lock()


def redactor() -> Redactor:
    """The process's redactor (every secret of every config loaded so far)."""
    return _installed


def install(extra: Redactor) -> None:
    """Add ``extra``'s secrets to the process's redactor. Secrets are never forgotten: hiding
    a value a later config no longer uses costs nothing, showing one would leak it."""
    global _installed
    with _install_lock:
        if not extra.secrets <= _installed.secrets:  # every Syncer installs its config's
            _installed = _installed.union(extra)


def redact(text: str) -> str:
    """``text`` through the process's redactor."""
    return _installed.redact(text)


def redact_url(url: str) -> str:
    """A URL for display: userinfo credentials and known secrets hidden."""
    return _installed.redact(url)


# --- finding the secrets in a config tree ----------------------------------------------------


def url_secrets(url: str) -> list[str]:
    """The credentials in a URL's userinfo: the password (and, split at an unencoded ``@``,
    each of its parts), and the user name when it is one: when it looks like a token, or is
    an HTTP URL's only credential (tokens travel as user names). A plain name beside a
    password is not hidden: `user:pw@` would otherwise mangle every "user" in the output
    (`user_00003`), as `postgres` would every "postgresql"."""
    try:
        parts = urlsplit(url.strip())
        user, password = parts.username, parts.password
    except ValueError:
        return []
    found: list[str] = []
    if password:
        found += [password, *password.split("@")]
    http_token = parts.scheme.lower() in _HTTP_SCHEMES and not password
    if user and (http_token or _token_like(user)):
        found += [user, *user.split("@")]
    if (user or password) and parts.scheme.lower() in _HTTP_SCHEMES:
        # Sent as an HTTP Basic Authorization header: a destination echoing our headers
        # echoes this form.
        basic = f"{unquote(user or '')}:{unquote(password or '')}"
        found.append(base64.b64encode(basic.encode()).decode())
    found += _param_secrets(parts.query) + _param_secrets(parts.fragment)
    return [s for s in found if len(s) >= MIN_SECRET_LENGTH]


def _param_secrets(text: str) -> list[str]:
    """The values of credential-like parameters in a query string (or a fragment: OAuth puts
    tokens there), as written (``ab+cd``, ``%2f``) and decoded; ``&`` or ``;`` separated."""
    found: list[str] = []
    for pair in re.split(r"[&;]", text):
        name, equals, raw = pair.partition("=")
        if equals and is_secret_param(unquote(name)):
            found += [
                v
                for v in (raw, unquote(raw.replace("+", " ")))
                if len(v) >= MIN_PARAM_SECRET_LENGTH
            ]
    return found


def is_secret_param(name: str) -> bool:
    """Whether a URL query parameter of this name carries a credential: one of its words
    (split at ``_``, ``-``, ``.`` and lower-to-upper case changes) names one."""
    words = re.split(r"[_\-.\s]+|(?<=[a-z0-9])(?=[A-Z])", name)
    return any(_SECRET_PARAM.match(word) for word in words if word) or bool(
        _SECRET_PARAM.match(re.sub(r"[_\-.\s]", "", name))
    )


def url_pieces(url: str) -> list[str]:
    """A URL that is a secret whole, in the pieces a request URL built from it still shows:
    everything before its query (without trailing slashes), its path alone (a destination
    echoing the path it was sent to) and its query — a destination sends ``/v1/batch``
    between the first and the last."""
    base, mark, query = url.strip().partition("?")
    base = base.split("#", 1)[0].rstrip("/")
    pieces = [base]
    with contextlib.suppress(ValueError):
        pieces.append(urlsplit(base).path)
    if mark:
        pieces.append(query.split("#", 1)[0])
    # A piece as short as "a=b" would mangle unrelated output and protect little.
    return [p for p in pieces if len(p) >= 8]


def _token_like(user: str) -> bool:
    """A database user name that is really a credential (long, letters and digits mixed)."""
    return len(user) >= 16 and any(c.isdigit() for c in user) and any(c.isalpha() for c in user)


def collect_secrets(tree: Any, interpolated: Iterable[tuple[str, str]] = ()) -> list[str]:
    """Every secret in a config tree (the raw TOML dict or a model dump): values of secret
    keys and credential headers, URL userinfo, and values read from the environment
    (``interpolated``: (TOML path, resolved text or one variable's value) pairs) into secret
    keys, headers, URLs or SQL (the loader passes only a query's variables' values)."""
    found: list[str] = []
    _walk(tree, "", found)
    for path, value in interpolated:
        last = path.rsplit(".", 1)[-1]
        secret_key = _SECRET_KEY.search(last) or last in _URL_KEYS or last in _SQL_KEYS
        if secret_key or ".headers." in f".{path}":
            found.append(value)
        if last in _URL_KEYS and "://" in value:
            found.extend(url_pieces(value))
    return found


def is_sql_path(path: str) -> bool:
    """Whether the config value at this TOML path is SQL a source runs."""
    return path.rsplit(".", 1)[-1] in _SQL_KEYS


def is_secret_variable(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential (``PGKEY``,
    ``TENANT_TOKEN``, ``PGP_PASSPHRASE``, ``DB_PW``), by its words: ``SORT_KEY``,
    ``MONKEY_SCHEMA`` and ``AUTHOR_TABLE`` do not."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    # Plurals and short forms (API_KEYS, PASSWORDS, DB_CREDS) are the word.
    words = ["credential" if w == "creds" else _singular(w) for w in words]
    for i, word in enumerate(words):
        if word in _ORDINARY_WORDS or (word == "key" and i and words[i - 1] in _KEY_CONTEXTS):
            continue  # SORT_KEY, ID_KEY: a column
        if word == "pass" and i + 1 < len(words):
            continue  # PASS_THROUGH
        if word in _SECRET_WORDS or word.endswith(_SECRET_ENDINGS):
            return True
    return False


def _singular(word: str) -> str:
    """A credential word's plural as the word (KEYS, PASSWORDS); other words as they are."""
    if word.endswith("s") and (word[:-1] in _SECRET_WORDS or word[:-1].endswith(_SECRET_ENDINGS)):
        return word[:-1]
    return word


def is_secret_path(path: str) -> bool:
    """Whether the config value at this TOML path is a credential."""
    if _SECRET_PATH.match(path):
        return True
    parent, _, last = path.rpartition(".")
    if parent.endswith("headers") or parent == "headers":
        return bool(_SECRET_HEADER.search(last))
    return bool(_SECRET_KEY.search(last))


def _walk(value: Any, path: str, found: list[str]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _walk(item, f"{path}.{key}" if path else str(key), found)
        return
    if isinstance(value, list | tuple):
        for item in value:
            _walk(item, path, found)
        return
    secret = isinstance(value, SecretStr) or is_secret_path(path)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return
    text = str(value)
    if secret:
        found.append(text)
        found.extend(text.split()[1:])  # "Bearer <token>": the token alone too
        if path.endswith("write_key"):
            # Sent as HTTP Basic user name: a destination echoing our headers echoes this.
            found.append(base64.b64encode(f"{text}:".encode()).decode())
    if "://" in text:
        found.extend(url_secrets(text))
