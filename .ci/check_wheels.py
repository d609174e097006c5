"""The built wheels hold what they should: the product (runctl-bot) no sandbox module and no
import of what only the sandbox needs; the sandbox (runctl-sandbox) the console's example
scripts. Usage: check_wheels.py PRODUCT_WHEEL SANDBOX_WHEEL"""

from __future__ import annotations

import ast
import sys
import zipfile

SANDBOX_ONLY = {"runctl_sandbox", "moto", "werkzeug", "fakeredis"}
EXAMPLES = ("runctl_protocol.py", "train_with_checkpoints.py", "train_torch.py")


def imported_roots(source: str) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def product_problems(wheel: zipfile.ZipFile) -> list[str]:
    problems = []
    for name in wheel.namelist():
        if "sandbox" in name.lower() or name.startswith("runctl_sandbox"):
            problems.append(f"{name}: a sandbox file")
        if name.endswith(".py"):
            found = imported_roots(wheel.read(name).decode()) & SANDBOX_ONLY
            if found:
                problems.append(f"{name}: imports {', '.join(sorted(found))}")
    if not any(name.endswith(".py") for name in wheel.namelist()):
        problems.append("no Python module at all")
    return problems


def sandbox_problems(wheel: zipfile.ZipFile) -> list[str]:
    names = set(wheel.namelist())
    return [f"runctl_sandbox/training/{e}: missing" for e in EXAMPLES if f"runctl_sandbox/training/{e}" not in names]


def main(product: str, sandbox: str) -> int:
    with zipfile.ZipFile(product) as p, zipfile.ZipFile(sandbox) as s:
        problems = product_problems(p) + sandbox_problems(s)
        modules = sum(name.endswith(".py") for name in p.namelist())
    for problem in problems:
        print(f"wheel check: {problem}", file=sys.stderr)
    if not problems:
        print(f"wheel check: {modules} modules in the product wheel, none of the sandbox's; the examples ship")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
