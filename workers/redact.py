"""Credentials out of text that names a repository or URL, before it reaches Slack or a log.

`RUNCTL_REPO` may carry them (`https://user:token@host/org/repo.git`,
`https://host/repo.git?private_token=…`), and git repeats the URL in its errors.
"""

from __future__ import annotations

import re

HIDDEN = "***"

# scheme://userinfo@ : everything up to the last @ before the path is userinfo (RFC 3986 3.2.1)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s?#]*)@")
# ?token=… &access_token=… &X-Amz-Signature=… &password=… : any parameter naming a secret
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;][^=&;\s#]*(?:token|passw|pwd|secret|key|sig|auth|credential)[^=&;\s#]*=)[^&;\s#'\"]*",
    re.IGNORECASE,
)
# tokens that are secrets wherever they appear (GitHub, GitLab, Slack, AWS access key ids)
_BARE = re.compile(
    r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|glpat-[\w-]{20,}|xox[abeprs]-[\w-]{10,}|AKIA[0-9A-Z]{16})\b"
)


def redact(text: str) -> str:
    """`text` with URL userinfo, secret query parameters and known token shapes replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{HIDDEN}@", text)
    text = _SECRET_PARAM.sub(lambda m: f"{m['name']}{HIDDEN}", text)
    return _BARE.sub(HIDDEN, text)
