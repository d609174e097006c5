"""Instance names as people type them. Two names that differ only in case or in Unicode form
(fullwidth letters, ligatures, `ß`/`ss`) are one name: a command finds an instance by either,
so a launch may not take a name another instance already answers to."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from typing import TYPE_CHECKING

from workers.errors import RunConflict
from workers.slack.escape import code

if TYPE_CHECKING:
    from workers.aws.instance import Instance

GONE = ("terminated", "shutting-down")
HOW = "names compare without case"


def fold(name: str) -> str:
    """NFKC, then casefold, then NFKC again (casefolding can undo a normal form)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def answering(name: str, instances: Iterable[Instance]) -> list[Instance]:
    """The live instances a typed `name` could mean."""
    want = fold(name)
    return [i for i in instances if i.name and i.state not in GONE and fold(i.name) == want]


def matched_note(typed: str, inst: Instance) -> str:
    """Said when a typed name found its instance only after folding."""
    return f"{code(typed)} matched {code(inst.name)} ({HOW})."


def refuse_taken(name: str, instances: Iterable[Instance], command: str) -> None:
    """Refuse launching an instance named `name` while another answers to it; `command` is the
    launch command without its `--name`, to suggest a free name with."""
    every = list(instances)
    clash = answering(name, every)
    if not clash:
        return
    taken = {fold(i.name) for i in every if i.name and i.state not in GONE}
    free = next(f"{name[:60]}-{n}" for n in range(2, len(taken) + 3) if fold(f"{name[:60]}-{n}") not in taken)
    held = ", ".join(f"{code(i.name)} ({i.id})" for i in clash[:3])
    raise RunConflict(
        f"The name {code(name)} is taken: {held} already answers to it.",
        why=f"Commands find an instance by its name, and {HOW} or Unicode form (NFKC): "
        "two instances with one name could be mistaken for each other.",
        fix=code(f"{command} --name {free}"),
    )
