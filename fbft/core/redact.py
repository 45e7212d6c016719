"""One redaction for every way a URI leaves the process (terminal, MLflow params and tags, state
files, the UI command, error messages): no ``user:password@`` and no credential in a query.

Passwords may hold ``/``, ``@``, ``?`` or ``%``-escapes (SQLAlchemy URLs such as
``postgresql://bob:pa/ss@host/db`` are valid), so the user information is everything up to the
*last* ``@`` before the query (or the last ``@`` at all when the password holds a ``?``) whose
user name holds no ``/`` — a path such as ``s3://bucket/v@2`` is not user information. Query
values are hidden when their name looks like a credential (``token``, ``api_key``, ``auth``,
``password``, ``secret``, ``sig``, every ``X-Amz-*``, ...). Over-redacting is the safe error.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

HIDDEN = "***"
_URI = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]*://[^\s'"<>`]+""")
_SECRET = re.compile(
    r"(?i)^(x-amz-.*|.*(token|key|secret|sig|auth|pass|pwd|credential|session|signature).*)$"
)


def redact_uri(uri: str) -> str:
    """``uri`` without its user information and query credentials."""
    head, _, rest = uri.partition("://")
    if not _:
        return uri
    ats = [i for i, c in enumerate(rest) if c == "@"]
    if ats:
        query = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        cut = max((i for i in ats if i < query), default=ats[-1])
        if "/" not in rest[:cut].split(":", 1)[0]:
            rest = HIDDEN + rest[cut:]
    rest, hash_, fragment = rest.partition("#")
    path, mark, query = rest.partition("?")
    return f"{head}://{path}{mark}{_params(query)}{hash_}{_params(fragment)}"


def _params(query: str) -> str:
    """``a=1&token=x`` -> ``a=1&token=***`` (values of other names redacted as text)."""
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        name, eq, value = parts[i].partition("=")
        if eq:
            parts[i] = f"{name}={HIDDEN if _SECRET.match(unquote(name)) else redact(value)}"
    return "".join(parts)


def redact(text: str) -> str:
    """``text`` (a URI, a command line, an error message) with every URI in it redacted."""
    return _URI.sub(_one, str(text))


def _one(match: re.Match[str]) -> str:
    """A URI found in text; punctuation that ends a sentence is kept, not hidden."""
    uri = match.group().rstrip(".,;:!)]}")
    return redact_uri(uri) + match.group()[len(uri) :]
