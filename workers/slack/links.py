"""Which links a run's log may put on its message: only `https` URLs of the trackers' own
hosts, each checked here (the log is the training's to write, so it may name any host).

| Kind | Hosts | Button |
| --- | --- | --- |
| W&B | `wandb.ai` | W&B run |
| MLflow | Databricks' hosted MLflow (a URL naming `experiments`): `*.cloud.databricks.com`, | MLflow run |
|  | `*.azuredatabricks.net`, `*.gcp.databricks.com` |  |
| TensorBoard | `tensorboard.dev` | TensorBoard |
| Comet | `comet.com`, `www.comet.com` | Comet |
| Hugging Face | `huggingface.co` | Hugging Face |

A self-hosted MLflow or TensorBoard server is on a host runctl cannot tell from any other,
so it is not linked (a log line naming `http://10.0.0.5:5000/#/experiments/1/runs/ab` is not
a button); TensorBoard log directories are shown as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL = 1000  # Slack takes 3,000 characters in a button's url; a tracker's run URL is far shorter
MAX_LINKS = 5

_EXACT = {
    "wandb.ai": "wandb",
    "tensorboard.dev": "tensorboard",
    "comet.com": "comet",
    "www.comet.com": "comet",
    "huggingface.co": "huggingface",
}
_MLFLOW_SUFFIXES = (".cloud.databricks.com", ".azuredatabricks.net", ".gcp.databricks.com")
LABELS = {
    "wandb": "W&B run",
    "mlflow": "MLflow run",
    "tensorboard": "TensorBoard",
    "comet": "Comet",
    "huggingface": "Hugging Face",
}
# What a run's own page looks like, preferred over a project's or a workspace's.
_RUN_PAGE = {
    "wandb": re.compile(r"/runs/[^/]+"),
    "mlflow": re.compile(r"(experiments/\d+/runs/|/ml/experiments/)"),
    "comet": re.compile(r"^/[^/]+/[^/]+/[0-9a-f]{16,}"),
}
_SAFE = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


@dataclass(frozen=True)
class Link:
    kind: str
    url: str

    @property
    def label(self) -> str:
        return LABELS[self.kind]


def kind_of(url: str) -> str | None:
    """The tracker a URL belongs to, or None: not `https`, not one of the hosts, or not plain."""
    if len(url) > MAX_URL or not _SAFE.fullmatch(url) or any(c in url for c in "<>|\"'`"):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme != "https" or parts.username is not None or parts.password is not None:
        return None
    if "@" in parts.netloc or port not in (None, 443):
        return None
    host = (parts.hostname or "").lower().rstrip(".")
    if host in _EXACT:
        return _EXACT[host]
    if any(host.endswith(s) and len(host) > len(s) for s in _MLFLOW_SUFFIXES) and "experiments" in url:
        return "mlflow"
    return None


def pick(candidates: list[str]) -> list[Link]:
    """One link per tracker, in the trackers' order: the last run page the log named, else its last link."""
    by_kind: dict[str, list[str]] = {}
    for url in candidates:
        kind = kind_of(url)
        if kind is not None:
            by_kind.setdefault(kind, []).append(url)
    found: list[Link] = []
    for kind in LABELS:
        urls = by_kind.get(kind)
        if not urls:
            continue
        page = _RUN_PAGE.get(kind)
        runs = [u for u in urls if page is not None and page.search(urlsplit(u).path + "#" + urlsplit(u).fragment)]
        found.append(Link(kind, (runs or urls)[-1]))
    return found[:MAX_LINKS]
