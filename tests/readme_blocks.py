"""The README's shell blocks, as tests see them.

Every ```bash block carries a marker on the line before it:
    <!-- doc-test: run -->                  the suite runs it as written (tests/test_readme.py)
    <!-- doc-test: check. <why not run> --> it needs what this machine lacks (a cloud account, a GPU,
                                            hours); its commands are checked: the program exists, its
                                            flags are accepted, the files and configs it names parse.
Runs change only the ports (a test session has its own Ray cluster on the defaults)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_BLOCK = re.compile(r"(?:<!-- doc-test: (?P<mode>run|check)(?P<why>.*?)-->\n)?```bash\n(?P<code>.*?)```", re.S)


@dataclass(frozen=True)
class Block:
    mode: str | None  # run | check | None (unmarked: an error)
    why: str
    code: str
    line: int  # of the opening fence, for messages

    def __str__(self) -> str:
        return f"README.md line {self.line} ({self.mode or 'unmarked'})"


def blocks(text: str) -> list[Block]:
    return [Block(m["mode"], m["why"].strip(" .\n"), m["code"], text.count("\n", 0, m.start("code")))
            for m in _BLOCK.finditer(text)]


def with_ports(code: str, ports: dict[int, int], head_flags: list[str]) -> str:
    """The block with its well-known ports replaced (8265 dashboard, 8000 HTTP) and a `ray start
    --head` given free ports for every service that has a fixed default."""
    for old, new in ports.items():
        code = re.sub(rf"(?<![\d.]){old}(?!\d)", str(new), code)
    return code.replace("ray start --head", "ray start --head " + " ".join(head_flags))


def commands(code: str) -> list[list[str]]:
    """Simple commands of a block: continuation lines joined, comments dropped, split at ; && || | &."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lex.whitespace_split = True
        lex.commenters = "#"
        words: list[str] = []
        tokens = list(lex)
        i = 0
        while i < len(tokens):
            t = tokens[i]
            if t in {";", "&", "&&", "||", "|"}:
                out.append(words) if words else None
                words = []
            elif t and set(t) <= set("<>&"):  # a redirection (2>&1, > file): skip its fd and target
                if words and words[-1].isdigit():
                    words.pop()
                i += 1
            else:
                words.append(t)
            i += 1
        if words:
            out.append(words)
    # a lone assignment (HEAD_PID=$!) is not a command
    return [w for w in out if not (len(w) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", w[0]))]


class CheckError(AssertionError):
    pass


def check_command(words: list[str], where: str) -> None:
    """Raise CheckError when the command could not run as written on a machine that has what it needs."""
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    prog, args = words[0], words[1:]
    name = Path(prog).name
    if prog.startswith(".venv/bin/") and not (ROOT / prog).exists():
        raise CheckError(f"{where}: {prog} does not exist after scripts/setup.sh")
    if name == "mcl-ray":
        return check_mcl_ray(args, where)
    if name.startswith("python"):
        if args[:2] == ["-m", "mcl_ray"]:
            return check_mcl_ray(args[2:], where)
        if args[:2] == ["-m", "pytest"]:
            return
        if args and args[0].endswith(".py"):
            return check_script(args[0], args[1:], where)
        raise CheckError(f"{where}: no check for `{shlex.join(words)}`")
    if name == "bash" and args and args[0].endswith(".sh"):
        script = ROOT / args[0]
        if not script.exists():
            raise CheckError(f"{where}: {args[0]} does not exist")
        for a in args[1:]:  # a mode argument is one of the script's case labels
            if not re.search(rf"^\s*{re.escape(a)}\)", script.read_text(), re.M):
                raise CheckError(f"{where}: {args[0]} has no mode {a!r}")
        return
    if name == "ray":
        return check_ray(args, where)
    if name == "kubectl":
        return check_kubectl(args, where)
    if name in {"serve", "tensorboard", "curl", "optuna-dashboard"}:
        return
    raise CheckError(f"{where}: no check for program {prog!r}")


def check_mcl_ray(args: list[str], where: str) -> None:
    """Parse the arguments with the CLI's own parser (nothing runs), then load the config they name."""
    import typer.main

    from mcl_ray.cli import app
    from mcl_ray.core.config import load_config

    cmd = typer.main.get_command(app)  # typer's own (vendored) click objects
    rest = list(args)
    while hasattr(cmd, "commands"):  # a group
        while rest and rest[0].startswith("-"):  # the group's own options (--verbose)
            rest.pop(0)
        sub = cmd.get_command(None, rest[0]) if rest else None
        if sub is None:
            raise CheckError(f"{where}: `mcl-ray {shlex.join(args)}`: no such command {rest[:1]}")
        cmd, rest = sub, rest[1:]
    try:
        ctx = cmd.make_context(f"mcl-ray {cmd.name}", list(rest))
    except Exception as e:  # noqa: BLE001 (click's UsageError family, and Exit for --help)
        if hasattr(e, "format_message"):
            raise CheckError(f"{where}: `mcl-ray {shlex.join(args)}`: {e.format_message()}") from None
        return
    config = ctx.params.get("config")
    if config is not None and str(config).endswith((".yaml", ".yml")):
        load_config(ROOT / config, ctx.params.get("set_") or [])


def check_script(path: str, args: list[str], where: str) -> None:
    if not (ROOT / path).exists():
        raise CheckError(f"{where}: {path} does not exist")
    flags = {a.split("=")[0] for a in args if a.startswith("--")}
    if flags:
        h = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        missing = [f for f in sorted(flags) if f not in h.stdout]
        if h.returncode != 0 or missing:
            raise CheckError(f"{where}: {path} does not accept {missing or h.stderr[-500:]}")


def check_ray(args: list[str], where: str) -> None:
    """`ray <sub> ...`: the subcommand exists, its flags are accepted, its files parse, and a job's
    entrypoint (after `--`) is checked as a command of its own."""
    import yaml

    entry = args[args.index("--") + 1:] if "--" in args else []
    args = args[:args.index("--")] if "--" in args else args
    subs = [a for a in args[:2] if not a.startswith("-") and not a.endswith((".yaml", ".yml"))]
    if subs[:1] == ["job"]:
        subs = args[:2]
    h = subprocess.run([str(BIN / "ray"), *subs, "--help"], capture_output=True, text=True, timeout=120)
    if h.returncode != 0:
        raise CheckError(f"{where}: `ray {' '.join(subs)}` is not a ray command")
    for a in args:
        if a.startswith("--") and a.split("=")[0] not in h.stdout:
            raise CheckError(f"{where}: `ray {' '.join(subs)}` does not accept {a.split('=')[0]}")
        if a.endswith((".yaml", ".yml")):
            yaml.safe_load((ROOT / a).read_text())
    if entry:
        check_command(entry, where + " (job entrypoint)")


def check_kubectl(args: list[str], where: str) -> None:
    """kubectl is not installed here: the manifest must parse, and a RayJob's entrypoint is checked."""
    import yaml

    path = ROOT / args[args.index("-f") + 1]
    for doc in yaml.safe_load_all(path.read_text()):
        entry = (doc or {}).get("spec", {}).get("entrypoint")
        if entry:
            check_command(shlex.split(entry), f"{where} ({path.name} entrypoint)")
