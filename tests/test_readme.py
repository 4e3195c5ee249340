"""Every fenced ```bash and ```python block of README.md runs against an emulator, so the README cannot drift.

The README is parsed when the tests are collected: each block is one case, named after the nearest heading
above it and its place under that heading (e.g. `the-emulator-2-python`). Nothing here copies a command out
of the README; edit the README and the cases follow.

How a block is run, in a fresh temporary directory holding a copy of `sample_data/`:

- Shell blocks: backslash-continued lines are joined; each line is cut at a `# comment` (a `#` that starts
  a word outside quotes, as bash has it) and split at top-level `&&` and `;`. Each part is then:
  - `export NAME=value ...`: applied to the following commands of the block. A value `...` is the
    README's placeholder for a real key: it becomes the key of the test emulator.
  - `pip install ...`: not run (the package is installed already); its local targets must be this
    project and their extras must exist in pyproject.toml. Other requirements must be installed here.
  - `pytest ...`: not run (it would run this module again); pytest must be the configured test command,
    and the paths and markers it names must exist.
  - `enrich emulate ...`: started as a server on a free port (its `--port` replaced; addresses of the
    README's port in later commands and exports rewritten to it), waited for (15 s), left to serve the
    rest of the block, then stopped with SIGINT and required to exit within 5 s.
  - anything else: `bash -c` with a timeout; exit code 0 is required (see EXPECTED_EXIT). An
    `enrich run -o OUTPUT` that succeeds must have written OUTPUT.
  Every command gets PARALLEL_BASE_URL and PARALLEL_API_KEY of an emulator started by this module, unless
  the block exports its own; a non-local `--base-url` or exported PARALLEL_BASE_URL is replaced by the
  emulator, and proxies point at a closed local port, so nothing can reach the internet.
- Synopsis blocks (`enrich run INPUT ...`, `[--flag VALUE]` placeholders): not run. Every flag they name
  must be in `enrich <command> --help`, every flag of `--help` (but `-h`) must be in them, and every
  command of `enrich --help` must have a synopsis.
- Python blocks: run as a script by this interpreter, with the same environment. No prelude is added: a
  block that uses a name it does not define fails and says which. The only rewrite is the placeholder key
  (`api_key="..."`, `os.environ["PARALLEL_API_KEY"] = "..."`), which becomes the emulator's key.

Besides, every `from enrich import X` of the README and every name listed under "Other things the package
exports" must be importable from `enrich`.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from enrich import Emulator

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PYPROJECT = REPO / "pyproject.toml"
SAMPLE_DATA = REPO / "sample_data"

SHELL_LANGS = {"bash", "sh", "shell"}
PYTHON_LANGS = {"python", "py", "python3"}

COMMAND_TIMEOUT = 60.0  # seconds, per shell command and per python block
SERVER_START_TIMEOUT = 15.0
SERVER_STOP_TIMEOUT = 5.0
DEFAULT_EMULATE_PORT = 8787  # `enrich emulate`'s default port, for a README command that does not pass --port

# Commands the README says end with another exit code than 0, keyed by a substring of the command, each
# with the README's reason. Empty: every command the README shows today is meant to succeed.
EXPECTED_EXIT: dict[str, int] = {}

PLACEHOLDER = "..."  # the README's stand-in for a real API key
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
BLACKHOLE_PROXY = "http://127.0.0.1:9"  # a closed port: any request that is not local fails at once
LOCAL_ONLY_ENV = {
    "HTTP_PROXY": BLACKHOLE_PROXY,
    "HTTPS_PROXY": BLACKHOLE_PROXY,
    "ALL_PROXY": BLACKHOLE_PROXY,
    "NO_PROXY": "127.0.0.1,localhost,::1",
}

_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_FLAG = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")


# ---------------------------------------------------------------------------------------------------------
# Parsing the README


@dataclass(frozen=True)
class Block:
    lang: str  # "bash" or "python"
    text: str
    heading: str
    index: int  # 1-based, among the runnable blocks under the same heading
    line: int  # of the opening fence, 1-based

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-") or "top"
        return f"{slug}-{self.index}-{self.lang}"


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_HEADING = re.compile(r"^#{1,6}[ \t]+(?P<title>.*?)[ \t#]*$")


def readme_blocks(text: str) -> list[Block]:
    """The runnable fenced blocks of a Markdown text, with the heading each one is under."""
    blocks: list[Block] = []
    heading = ""
    counts: dict[str, int] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            title = _HEADING.match(lines[i])
            if title:
                heading = title["title"]
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        info = opening["info"].strip()
        lang = info.split()[0].lower() if info else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence) and set(stripped) == {fence[0]}:
                break
            raw = lines[j]
            body.append(raw[indent:] if raw[:indent].strip() == "" else raw)
            j += 1
        kind = "bash" if lang in SHELL_LANGS else "python" if lang in PYTHON_LANGS else None
        if kind:
            counts[heading] = counts.get(heading, 0) + 1
            blocks.append(Block(kind, "\n".join(body) + "\n", heading, counts[heading], i + 1))
        i = j + 1
    return blocks


README_TEXT = README.read_text(encoding="utf-8")
BLOCKS = readme_blocks(README_TEXT)
SHELL_BLOCKS = [b for b in BLOCKS if b.lang == "bash"]
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang == "python"]


def logical_lines(text: str) -> list[str]:
    """Lines of a shell block, with backslash-continued lines joined."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.rstrip()
        if stripped.endswith("\\") and not stripped.endswith("\\\\"):
            pending += stripped[:-1] + " "
            continue
        out.append(pending + raw)
        pending = ""
    if pending:
        out.append(pending)
    return out


def split_commands(line: str) -> list[str]:
    """A shell line cut at its `# comment` and split at top-level `&&` and `;`, quotes respected.

    As in bash, `#` starts a comment only at the start of a word, and never inside quotes: a URL's
    fragment or a quoted `#` stay. The parts are checked with shlex afterwards, so unbalanced quotes fail.
    """
    parts: list[str] = []
    buf: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote == "'":
            buf.append(c)
            quote = None if c == "'" else quote
        elif quote == '"':
            buf.append(c)
            if c == "\\" and i + 1 < len(line):
                buf.append(line[i + 1])
                i += 1
            elif c == '"':
                quote = None
        elif c == "\\" and i + 1 < len(line):
            buf.append(c + line[i + 1])
            i += 1
        elif c in "'\"":
            quote = c
            buf.append(c)
        elif c == "#" and (i == 0 or line[i - 1] in " \t" or not "".join(buf).strip()):
            break
        elif line.startswith("&&", i):
            parts.append("".join(buf))
            buf = []
            i += 1
        elif c == ";":
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(c)
        i += 1
    if quote is not None:
        raise ValueError(f"unbalanced {quote} in: {line}")
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip()]


def shell_commands(block: Block) -> list[str]:
    return [part for line in logical_lines(block.text) for part in split_commands(line)]


_SYNOPSIS_HINT = re.compile(r"^\s*enrich\s+[a-z]+\s+[A-Z][A-Z_]+\b|\[--?[A-Za-z]", re.MULTILINE)


def is_synopsis(block: Block) -> bool:
    """A block that documents commands' usage (`enrich run INPUT ... [--flag X]`) rather than runs them."""
    return block.lang == "bash" and bool(_SYNOPSIS_HINT.search(block.text))


def program(argv: list[str]) -> tuple[str, list[str], dict[str, str]]:
    """(program, its arguments, inline `NAME=value` assignments) of a command; `python -m X` is X."""
    assignments: dict[str, str] = {}
    while argv and _ASSIGNMENT.match(argv[0]):
        name, _, value = argv[0].partition("=")
        assignments[name] = value
        argv = argv[1:]
    if not argv:
        return "", [], assignments
    head = os.path.basename(argv[0])
    if re.fullmatch(r"python(3(\.\d+)?)?", head) and len(argv) >= 3 and argv[1] == "-m":
        head, argv = argv[2], argv[2:]
    if head == "pip3":
        head = "pip"
    return head, argv[1:], assignments


# ---------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator(latency=0.05, seed=0) as emulator:
        yield emulator


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(SAMPLE_DATA, tmp_path / "sample_data")
    return tmp_path


def enrich_exe() -> str:
    exe = shutil.which("enrich", path=str(Path(sys.executable).parent)) or shutil.which("enrich")
    assert exe, "the `enrich` console script is not installed in this environment"
    return exe


def base_env(emu: Emulator) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PARALLEL_") and k.upper() not in LOCAL_ONLY_ENV
    }
    env["PATH"] = str(Path(enrich_exe()).parent) + os.pathsep + env.get("PATH", "")
    env["PARALLEL_BASE_URL"] = emu.url
    env["PARALLEL_API_KEY"] = emu.api_key
    for name, value in LOCAL_ONLY_ENV.items():
        env[name] = env[name.lower()] = value
    return env


def is_local(url: str) -> bool:
    try:
        return urlsplit(url).hostname in LOCAL_HOSTS
    except ValueError:
        return False


def expand(value: str, env: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` replaced from env, as the shell would."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m[1] or m[2], ""), value)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def help_options(subcommand: str) -> tuple[frozenset[str], ...]:
    """The options of `enrich <subcommand> --help`, each as the set of its spellings (`-o`, `--output`)."""
    out = subprocess.run(
        [enrich_exe(), subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, f"`enrich {subcommand} --help` failed:\n{out.stderr}"
    options = []
    for line in out.stdout.splitlines():
        if re.match(r"^ {2}-", line):  # argparse indents each option's invocation by two spaces
            invocation = re.split(r"\s{2,}", line.strip())[0]
            options.append(frozenset(_FLAG.findall(invocation)))
    return tuple(options)


@functools.cache
def help_subcommands() -> tuple[str, ...]:
    """The commands `enrich --help` lists (argparse indents them by four spaces)."""
    out = subprocess.run([enrich_exe(), "--help"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert out.returncode == 0, f"`enrich --help` failed:\n{out.stderr}"
    return tuple(re.findall(r"^ {4}(\w[\w-]*)\s", out.stdout, re.MULTILINE))


# ---------------------------------------------------------------------------------------------------------
# Shell blocks


@dataclass
class Server:
    """An `enrich emulate` of the README, serving on a free port instead of the README's."""

    proc: subprocess.Popen[bytes]
    url: str
    api_key: str | None
    log: Path
    readme_port: int
    readme_host: str

    def rewrite(self, text: str) -> str:
        hosts = "|".join(re.escape(h) for h in {self.readme_host, *LOCAL_HOSTS - {"::1"}})
        return re.sub(rf"https?://(?:{hosts}):{self.readme_port}(?!\d)", self.url, text)


@dataclass
class ShellBlockRun:
    block: Block
    cwd: Path
    emu: Emulator
    env: dict[str, str] = field(init=False)
    exported: dict[str, str] = field(default_factory=dict)
    servers: list[Server] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.env = base_env(self.emu)

    def value(self, raw: str) -> str:
        """An assigned value as the test uses it: placeholder key, `$VAR`s, and emulators' new ports."""
        if raw == PLACEHOLDER:
            return self.emu.api_key
        value = expand(raw, self.env)
        for server in self.servers:
            value = server.rewrite(value)
        return value

    def run(self) -> None:
        try:
            for command in shell_commands(self.block):
                self.command(command)
            self.check_exports_match_servers()
        except BaseException:
            self.stop_servers(check=False)  # the first failure is the one to report
            raise
        self.stop_servers(check=True)

    def command(self, text: str) -> None:
        try:
            argv = shlex.split(text)
        except ValueError as exc:
            pytest.fail(f"cannot parse `{text}`: {exc}")
        name, args, assignments = program(argv)
        if name == "export":
            for item in args:
                if "=" in item and not item.startswith("-"):
                    var, _, raw = item.partition("=")
                    self.export(var, self.value(raw))
            return
        if name == "pip" and args[:1] == ["install"]:
            check_pip_install(args[1:], text)
            return
        if name == "pytest":
            check_pytest(args, text)
            return
        if name == "enrich" and args[:1] == ["emulate"] and not {"-h", "--help"} & set(args):
            env = {**self.env, **{k: self.value(v) for k, v in assignments.items()}}
            self.start_server([a for a in args[1:] if a != "&"], env, text)
            return
        self.execute(text, name, args)

    def export(self, var: str, value: str) -> None:
        self.exported[var] = value
        if var == "PARALLEL_BASE_URL" and not is_local(value):
            value = self.emu.url  # never the real service
        self.env[var] = value

    def execute(self, text: str, name: str, args: list[str]) -> None:
        shown = text
        # The placeholder key in an inline assignment (`PARALLEL_API_KEY=... enrich run ...`).
        text = re.sub(
            r"(?<![\w-])([A-Za-z_]\w*)=\.\.\.(?=\s|$)", rf"\g<1>={shlex.quote(self.emu.api_key)}", text
        )
        for server in self.servers:
            text = server.rewrite(text)
        for i, arg in enumerate(args):
            url = args[i + 1] if arg == "--base-url" and i + 1 < len(args) else None
            url = arg.removeprefix("--base-url=") if arg.startswith("--base-url=") else url
            if url and not is_local(expand(url, self.env)):
                text = text.replace(url, self.emu.url)  # never the real service
        expected = next((code for key, code in EXPECTED_EXIT.items() if key in shown), 0)
        started = time.monotonic()
        try:
            done = subprocess.run(
                ["bash", "-o", "pipefail", "-c", text],
                cwd=self.cwd,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
            )
        except subprocess.TimeoutExpired as exc:
            out = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            pytest.fail(f"`{shown}` did not finish within {COMMAND_TIMEOUT:.0f} s:\n{tail(out)}")
        assert done.returncode == expected, (
            f"`{shown}` exited with {done.returncode}, expected {expected} "
            f"(after {time.monotonic() - started:.1f} s)\n"
            f"--- stderr:\n{tail(done.stderr)}\n--- stdout:\n{tail(done.stdout)}"
        )
        if name == "enrich" and args[:1] == ["run"] and expected == 0:
            check_output_written(args[1:], self.cwd, shown)

    def start_server(self, args: list[str], env: dict[str, str], shown: str) -> None:
        readme_port, host, api_key, rest = DEFAULT_EMULATE_PORT, "127.0.0.1", None, []
        i = 0
        while i < len(args):
            arg, nxt = args[i], args[i + 1] if i + 1 < len(args) else ""
            if arg in ("--port", "--host", "--api-key"):
                i += 1
            elif arg.startswith(("--port=", "--host=", "--api-key=")):
                arg, _, nxt = arg.partition("=")
            else:
                rest.append(arg)
                i += 1
                continue
            if arg == "--port":
                readme_port = int(nxt)
            elif arg == "--host":
                host = nxt
                rest += ["--host", nxt]
            else:
                api_key = nxt
                rest += ["--api-key", nxt]
            i += 1
        port = free_port()
        log = self.cwd / f"emulate-{port}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [enrich_exe(), "emulate", *rest, "--port", str(port)],
                cwd=self.cwd,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host
        server = Server(proc, f"http://{connect_host}:{port}", api_key, log, readme_port, host)
        self.servers.append(server)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"`{shown}` exited with {proc.returncode} instead of serving:\n{tail(log.read_text())}"
                )
            try:
                socket.create_connection((connect_host, port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"`{shown}` did not accept connections within {SERVER_START_TIMEOUT:.0f} s:\n"
                        f"{tail(log.read_text())}"
                    )
                time.sleep(0.1)

    def check_exports_match_servers(self) -> None:
        """An `export` next to `enrich emulate` must point at it, with the key it accepts."""
        if not self.servers:
            return
        urls = {s.url for s in self.servers}
        if "PARALLEL_BASE_URL" in self.exported:
            assert self.exported["PARALLEL_BASE_URL"] in urls, (
                f"the block exports PARALLEL_BASE_URL={self.exported['PARALLEL_BASE_URL']}, which is not "
                f"the emulator it starts (README port {self.servers[0].readme_port})"
            )
        keys = {s.api_key for s in self.servers}
        if "PARALLEL_API_KEY" in self.exported and None not in keys:
            assert self.exported["PARALLEL_API_KEY"] in keys, (
                "the block exports a PARALLEL_API_KEY that its emulator's --api-key refuses"
            )
        for server in self.servers:
            assert server.proc.poll() is None, (
                f"the emulator stopped on its own (exit {server.proc.returncode}):\n"
                f"{tail(server.log.read_text())}"
            )

    def stop_servers(self, check: bool) -> None:
        problems = []
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGINT)
                try:
                    server.proc.wait(SERVER_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                    server.proc.wait()
                    problems.append(
                        f"`enrich emulate` did not exit within {SERVER_STOP_TIMEOUT:.0f} s of SIGINT"
                    )
                    continue
            log = server.log.read_text(errors="replace")
            if "Traceback" in log:
                problems.append(f"`enrich emulate` printed a traceback:\n{tail(log)}")
        self.servers.clear()
        assert not (check and problems), "\n".join(problems)


def check_output_written(args: list[str], cwd: Path, shown: str) -> None:
    if {"--dry-run", "-h", "--help"} & set(args):
        return
    output = None
    for i, arg in enumerate(args):
        if arg in ("-o", "--output") and i + 1 < len(args):
            output = args[i + 1]
        elif arg.startswith("--output="):
            output = arg.partition("=")[2]
    if output:
        assert (cwd / output).exists(), f"`{shown}` exited 0 but did not write {output}"


def check_pip_install(args: list[str], shown: str) -> None:
    """A README `pip install`, checked instead of run: local targets are this project, extras exist."""
    project = pyproject()["project"]
    extras_known = {normalize(e) for e in project.get("optional-dependencies", {})}
    with_value = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url"}
    targets: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-e", "--editable") and i + 1 < len(args):
            targets.append(args[i + 1])
            i += 1
        elif arg in ("-r", "--requirement") and i + 1 < len(args):
            assert (REPO / args[i + 1]).exists(), f"`{shown}`: no {args[i + 1]} in the repository"
            i += 1
        elif arg in with_value:
            i += 1
        elif not arg.startswith("-"):
            targets.append(arg)
        i += 1
    assert targets, f"`{shown}` installs nothing"
    for target in targets:
        m = re.fullmatch(r"(?P<path>[^\[]*)(?:\[(?P<extras>[^\]]*)\])?", target)
        assert m, target
        path, extras = m["path"], [e.strip() for e in (m["extras"] or "").split(",") if e.strip()]
        if path in (".", "..") or path.startswith(("./", "../", "/")):
            root = (REPO / path).resolve()
            assert root == REPO, f"`{shown}` installs {root}, not this project ({REPO})"
            missing = [e for e in extras if normalize(e) not in extras_known]
            assert not missing, (
                f"`{shown}` asks for extras {missing}, which pyproject.toml does not define "
                f"(it has {sorted(extras_known)})"
            )
        else:
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", path)
            assert name, f"`{shown}`: cannot read the requirement {target!r}"
            try:
                importlib.metadata.distribution(name[0])
            except importlib.metadata.PackageNotFoundError:
                pytest.fail(f"`{shown}` installs {name[0]}, which is not installed in the test environment")


def check_pytest(args: list[str], shown: str) -> None:
    """A README `pytest`, checked instead of run (it would run this module again)."""
    config = pyproject()
    ini = config.get("tool", {}).get("pytest", {}).get("ini_options")
    assert ini is not None, f"`{shown}`: pyproject.toml has no [tool.pytest.ini_options]"
    testpaths = [(REPO / p).resolve() for p in ini.get("testpaths", ["."])]
    here = Path(__file__).resolve()
    assert any(here.is_relative_to(p) for p in testpaths), f"`{shown}` would not collect {here.name}"
    requirements = [
        normalize(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0])
        for reqs in config["project"].get("optional-dependencies", {}).values()
        for r in reqs
    ]
    assert "pytest" in requirements, f"`{shown}`: pytest is in no extra of pyproject.toml"
    declared = {m.split(":")[0].strip() for m in ini.get("markers", [])}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-m" and i + 1 < len(args):
            names = set(re.findall(r"\w+", args[i + 1])) - {"and", "or", "not"}
            assert names <= declared, f"`{shown}`: markers {sorted(names - declared)} are not declared"
            i += 1
        elif arg in ("-k", "-n", "-p", "-c", "--maxfail", "--durations") and i + 1 < len(args):
            i += 1
        elif not arg.startswith("-"):
            assert (REPO / arg.split("::")[0]).exists(), f"`{shown}`: no {arg} in the repository"
        i += 1


def check_synopsis(block: Block) -> None:
    """Each usage line's flags are the flags of `enrich <command> --help`, both ways."""
    commands: list[str] = []
    for line in logical_lines(block.text):
        body = split_commands(line)
        if not body:
            continue
        text = " ".join(body)
        if re.match(r"^\s*enrich\b", line) or not commands:
            commands.append(text)
        else:
            commands[-1] += " " + text
    problems = []
    documented = set()
    for command in commands:
        words = command.split()
        if len(words) < 2 or words[0] != "enrich":
            problems.append(f"not an `enrich` usage line: {command!r}")
            continue
        sub = words[1]
        if sub.startswith("-"):  # a flag of `enrich` itself (--version): it must be in `enrich --help`
            top = subprocess.run([enrich_exe(), "--help"], capture_output=True, text=True, timeout=60).stdout
            if not re.search(rf"(^|[\s,]){re.escape(sub)}\b", top):
                problems.append(f"`enrich {sub}` is not an option of `enrich --help`")
            continue
        documented.add(sub)
        if sub not in help_subcommands():
            problems.append(f"`enrich {sub}` is not a command of `enrich --help`")
            continue
        options = help_options(sub)
        known = set().union(*options)
        named = set(_FLAG.findall(command))
        for flag in sorted(named - known):
            problems.append(f"`enrich {sub}`: the README names {flag}, which `--help` does not have")
        for spellings in options:
            if spellings & {"-h", "--help"}:
                continue
            if not spellings & named:
                problems.append(
                    f"`enrich {sub}`: {'/'.join(sorted(spellings))} is in `--help` but not in the README"
                )
    for sub in help_subcommands():
        if sub not in documented:
            problems.append(f"`enrich {sub}` is in `enrich --help` but has no usage line in the README")
    assert not problems, "the synopsis differs from the CLI:\n- " + "\n- ".join(problems)


# ---------------------------------------------------------------------------------------------------------
# Python blocks

_PLACEHOLDER_KEY = re.compile(
    r"""(\bapi_key\s*=\s*|\[\s*["']PARALLEL_API_KEY["']\s*\]\s*=\s*)(["'])\.\.\.\2"""
)


def run_python(block: Block, cwd: Path, emu: Emulator) -> None:
    # The one documented rewrite: the placeholder key `"..."` stands for a real key, the emulator's here.
    source = _PLACEHOLDER_KEY.sub(lambda m: m[1] + repr(emu.api_key), block.text)
    script = cwd / f"readme_{block.id.replace('-', '_')}.py"
    script.write_text(source, encoding="utf-8")
    try:
        done = subprocess.run(
            [sys.executable, script.name],
            cwd=cwd,
            env=base_env(emu),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the block (README line {block.line}) did not finish within {COMMAND_TIMEOUT:.0f} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        undefined = re.search(r"NameError: name '(\w+)' is not defined", done.stderr)
        reason = (
            f"uses the name {undefined[1]!r}, which it does not define: the block is not self-contained"
            if undefined
            else last
        )
        pytest.fail(f"README line {block.line}: {reason}\n--- stderr:\n{tail(done.stderr)}")


# ---------------------------------------------------------------------------------------------------------
# The tests


def test_readme_has_runnable_blocks() -> None:
    assert SHELL_BLOCKS and PYTHON_BLOCKS, "no ```bash or ```python block found in README.md: parser broken?"
    assert len({b.id for b in BLOCKS}) == len(BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, workdir: Path, emu: Emulator) -> None:
    if block.lang == "python":
        # A block of an optional extra's (`enrich.ray`) runs where that extra is installed (CI installs it).
        if re.search(
            r"^\s*(import ray|from enrich\.ray import)", block.text, re.M
        ) and not importlib.util.find_spec("ray"):
            pytest.skip("this block needs the ray extra: pip install -e '.[test,ray]'")
        # The Spark block needs PySpark and a JVM, and a Spark session's start: it runs where asked for,
        # as tests/test_spark.py does (CI installs neither).
        if re.search(r"^\s*(from pyspark|import pyspark|from enrich\.spark import)", block.text, re.M) and (
            os.environ.get("ENRICH_SPARK") != "1" or not importlib.util.find_spec("pyspark")
        ):
            pytest.skip(
                "this block needs the spark extra and a JVM: pip install -e '.[spark]', ENRICH_SPARK=1"
            )
        run_python(block, workdir, emu)
    elif is_synopsis(block):
        check_synopsis(block)
    else:
        ShellBlockRun(block, workdir, emu).run()


def _enrich_imports() -> dict[str, str]:
    """Names the README imports from `enrich`, or lists as its exports, each with where it says so."""
    names: dict[str, str] = {}
    for block in BLOCKS:
        found: list[str] = []
        try:
            tree = ast.parse(block.text) if block.lang == "python" else None
        except SyntaxError:
            tree = None
        if tree is not None:
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "enrich" and node.level == 0:
                    found += [a.name for a in node.names if a.name != "*"]
        else:
            for m in re.finditer(r"from\s+enrich\s+import\s+\(?([\w\s,]+)\)?", block.text):
                found += [n.strip().split()[0] for n in m[1].split(",") if n.strip()]
        for name in found:
            names.setdefault(name, f"block {block.id}")
    section = re.search(r"^.*Other things the package exports.*$", README_TEXT, re.MULTILINE)
    assert section, "README.md has no 'Other things the package exports' list any more"
    listing: list[str] = []
    for line in README_TEXT[section.end() :].splitlines():
        if not line.strip():
            if listing:
                break  # the blank line after the list
            continue
        if not (line.lstrip().startswith(("- ", "* ", "+ ")) or (listing and line.startswith(" "))):
            break  # a heading, or a paragraph: the list is over
        listing.append(line)
    for span in re.findall(r"`([^`]+)`", "\n".join(listing)):
        m = re.fullmatch(r"([A-Za-z_]\w*)(?:\(.*\))?", span.strip())
        if m:
            names.setdefault(m[1], "'Other things the package exports'")
    return names


def test_readme_names_are_exported() -> None:
    module = importlib.import_module("enrich")
    names = _enrich_imports()
    assert names, "the README names nothing to import from enrich: parser broken?"
    missing = [f"{name} (from {origin})" for name, origin in names.items() if not hasattr(module, name)]
    assert not missing, "the README names what `enrich` does not export:\n- " + "\n- ".join(missing)


def test_how_it_works_names_the_modules_that_exist() -> None:
    """The "How it works" section names each stage's module: every module it names is a file of the
    package, and every module of the engine is named (a stage added or renamed updates the tour)."""
    section = README_TEXT.split("## How it works", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(_[a-z_]+(?:/[a-z_]+)?\.py)`", section))
    package = REPO / "enrich"
    missing = sorted(n for n in named if not (package / n).is_file())
    assert not missing, f"README's How it works names modules that do not exist: {missing}"
    engine = {f"_engine/{p.name}" for p in (package / "_engine").glob("*.py") if p.name != "__init__.py"}
    unnamed = sorted(engine - named)
    assert not unnamed, f"README's How it works does not name these engine modules: {unnamed}"
