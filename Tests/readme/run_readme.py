#!/usr/bin/env python3
"""Runs the README's SQL and CLI examples, in README order, against one
scratch database, so that every example a reader copies works.

Usage: Tests/readme/run_readme.py [--list] [--keep] [--verbose] [README]

Connection: the libpq variables (PGHOST, PGPORT, PGUSER, PGPASSWORD,
PGDATABASE, PGSSLMODE) name a server and a database to connect to first.
The script creates a fresh database there, readme_<pid>, migrates it with
`$DISPATCH_POLICY_BIN migrate` (default: .build/debug/dispatch-policy from
the repository root), runs the examples in it and drops it at the end
(--keep leaves it). --list prints what would run, and needs no server;
--verbose prints every block's output.
Python 3 standard library only, plus psql on PATH (or $PSQL) and bash.

Which fenced code blocks run (the rule):

* ```sql blocks: the whole block, through
  `psql -X -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -f BLOCK`.
* ```sh, ```bash and ```shell blocks, and plain ``` blocks (no info
  string) whose first non-blank line starts with `dispatch-policy ` or
  `$ dispatch-policy `: the whole block as one bash script, under
  `set -euo pipefail`, in a scratch directory shared by all blocks (so a
  file one block writes, a later one reads), with DATABASE_URL and PGDATABASE
  naming the scratch database and `dispatch-policy` on PATH running
  $DISPATCH_POLICY_BIN. When some lines of a block begin with `$ `, only
  those lines (without the `$ `) run; the others are output.
* Every other block (json, swift, output, plain text) is documentation only.

Every block that matches runs unless an HTML comment on the line before its
opening fence (blank lines may come between) says otherwise:

* `<!-- readme-test: skip REASON -->` does not run it; the reason is
  required and printed. Long-running commands, servers, builds, and
  synopses with placeholders (`skip synopsis`) are marked so.
* `<!-- readme-test: expect-error SQLSTATE -->`: the block must fail, and
  with that SQLSTATE. An SQL block then runs without ON_ERROR_STOP, so every
  statement in it runs, and each error must have that SQLSTATE; a shell
  block must exit non-zero with `SQLSTATE XXXXX` in its standard error.

And a hidden prerequisite, anywhere in the README, runs as an SQL block at
its place in the order; keep it small, and only where the README reads
naturally without it:

    <!-- readme-test: setup
    SELECT ...;
    -->

A marker that is not directly before a block that would run, or that the
script does not understand, is an error, so markers cannot go stale.

Output of the examples is not compared (timings vary); exit status is. Each
psql call and each dispatch-policy command is bounded by 60 s, a whole shell
block by 120 s. A failure prints the README line of the block (and of the
failing statement or command when it is known) with the error, the other
blocks still run, and the script exits 1.
"""

import argparse
import getpass
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from urllib.parse import quote

COMMAND_TIMEOUT = 60  # seconds, for each psql call and each dispatch-policy command
BLOCK_TIMEOUT = 120  # seconds, for a whole shell block

SHELL_INFO = {"sh", "bash", "shell"}
MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
SETUP_OPEN = re.compile(r"^\s*<!--\s*readme-test:\s*setup\s*$")
COMMENT_CLOSE = re.compile(r"^\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")
CLI_LINE = re.compile(r"^(\$ )?dispatch-policy ")
SQLSTATE = re.compile(r"^[0-9A-Z]{5}$")


class ReadmeError(Exception):
    """The README cannot be read as the rule above says (a bad marker, an unclosed fence)."""


class Block:
    def __init__(self, kind, line, first, lines, info=""):
        self.kind = kind  # "sql", "sh", "setup", or "doc" (never runs)
        self.line = line  # README line of the opening fence (or of the setup comment)
        self.first = first  # README line of the first content line
        self.lines = lines
        self.info = info
        self.skip = None  # reason
        self.expect = None  # SQLSTATE

    def label(self):
        return "setup" if self.kind == "setup" else self.kind


def parse(text):
    """The README's blocks in order, with their markers applied."""
    lines = text.split("\n")
    blocks = []
    marker = None  # (line, directive) waiting for its block
    i = 0
    while i < len(lines):
        number = i + 1
        line = lines[i]
        if SETUP_OPEN.match(line):
            if marker:
                raise ReadmeError(f"line {marker[0]}: marker is followed by a setup comment, not a code block")
            body = []
            i += 1
            while i < len(lines) and not COMMENT_CLOSE.match(lines[i]):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ReadmeError(f"line {number}: setup comment never closed with -->")
            blocks.append(Block("setup", number, number + 1, body))
            i += 1
            continue
        match = MARKER.match(line)
        if match:
            if marker:
                raise ReadmeError(f"line {marker[0]}: marker is followed by another marker, not a code block")
            marker = (number, match.group(1))
            i += 1
            continue
        if re.match(r"^\s*<!--", line) and "readme-test" in line:
            raise ReadmeError(f"line {number}: not a marker this script understands: {line.strip()}")
        fence = FENCE.match(line)
        if fence:
            indent, ticks, info = len(fence.group(1)), fence.group(2), fence.group(3).strip()
            body = []
            i += 1
            closing = re.compile(r"^\s*" + re.escape(ticks[0]) + "{" + str(len(ticks)) + r",}\s*$")
            while i < len(lines) and not closing.match(lines[i]):
                content = lines[i]
                strip = min(indent, len(content) - len(content.lstrip(" ")))
                body.append(content[strip:])
                i += 1
            if i == len(lines):
                raise ReadmeError(f"line {number}: code block never closed")
            i += 1
            word = info.split()[0].lower() if info else ""
            first_text = next((b for b in body if b.strip()), "")
            if word == "sql":
                kind = "sql"
            elif word in SHELL_INFO or (word == "" and CLI_LINE.match(first_text)):
                kind = "sh"
            else:
                kind = "doc"
            block = Block(kind, number, number + 1, body, info)
            if marker:
                apply_marker(block, *marker)
                marker = None
            blocks.append(block)
            continue
        if marker and line.strip():
            raise ReadmeError(f"line {marker[0]}: marker is not directly before a code block")
        i += 1
    if marker:
        raise ReadmeError(f"line {marker[0]}: marker at the end of the README")
    return blocks


def apply_marker(block, line, directive):
    if block.kind == "doc":
        raise ReadmeError(f"line {line}: marker on the block at line {block.line} ({block.info or 'plain'}), which never runs")
    verb, _, rest = directive.partition(" ")
    rest = rest.strip()
    if verb == "skip":
        if not rest:
            raise ReadmeError(f"line {line}: skip needs a reason: <!-- readme-test: skip REASON -->")
        block.skip = rest
    elif verb == "expect-error":
        if not SQLSTATE.match(rest):
            raise ReadmeError(f"line {line}: expect-error needs a SQLSTATE (five characters), got {rest!r}")
        block.expect = rest
    else:
        raise ReadmeError(f"line {line}: unknown marker {directive!r} (skip REASON, expect-error SQLSTATE, setup)")


def run(command, env, cwd, timeout):
    """Runs a command in its own process group; kills the group when it outlives `timeout`.
    Returns (status, stdout, stderr); status None means it timed out."""
    process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
        return process.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = process.communicate()
        return None, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def database_url(env, database):
    """A postgres:// URL for `database` on the server the PG* variables name."""
    host = env.get("PGHOST") or "localhost"
    port = env.get("PGPORT") or "5432"
    user = env.get("PGUSER") or getpass.getuser()
    userinfo = quote(user, safe="")
    if env.get("PGPASSWORD"):
        userinfo += ":" + quote(env["PGPASSWORD"], safe="")
    params = []
    if host.startswith("/"):
        netloc = userinfo + "@"
        params += [("host", host), ("port", port)]
    else:
        netloc = f"{userinfo}@{'[' + host + ']' if ':' in host else host}:{port}"
    if env.get("PGSSLMODE"):
        params.append(("sslmode", env["PGSSLMODE"]))
    query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in params)
    return f"postgres://{netloc}/{quote(database, safe='')}" + (f"?{query}" if query else "")


def indent(text, prefix="    "):
    return "".join(prefix + line + "\n" for line in text.rstrip("\n").split("\n")) if text.strip() else ""


class Runner:
    """Runs blocks; each method returns (error, output), error None when the block did what it should."""

    def __init__(self, psql, env, workdir):
        self.psql = psql
        self.env = env
        self.workdir = workdir

    def psql_block(self, block, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(block.lines) + "\n")
        stop = "0" if block.expect else "1"
        command = [self.psql, "-X", "-q", "-P", "pager=off", "-v", f"ON_ERROR_STOP={stop}", "-v", "VERBOSITY=verbose", "-f", path]
        status, out, err = run(command, self.env, self.workdir, COMMAND_TIMEOUT)
        output = out + err
        if status is None:
            return f"psql did not finish within {COMMAND_TIMEOUT} s\n" + indent(err), output
        # psql:FILE:N: ERROR:  SQLSTATE: message -- N is the block's line where the statement ended.
        errors = re.findall(r"^psql:" + re.escape(path) + r":(\d+): (?:ERROR|FATAL):  (\w{5}): (.*)$", err, re.M)
        where = [f"the statement ending at README line {block.first + int(n) - 1}: SQLSTATE {code}: {message}"
                 for n, code, message in errors]
        if block.expect:
            wrong = [w for w, (_, code, _) in zip(where, errors) if code != block.expect]
            if status != 0:
                return f"psql exited with status {status}\n" + indent(err), output
            if not errors:
                return f"expected an error with SQLSTATE {block.expect}, but every statement succeeded", output
            if wrong:
                return f"expected only SQLSTATE {block.expect}, got:\n" + indent("\n".join(wrong)), output
            return None, output
        if status != 0 or errors:
            return (("\n".join(where) + "\n") if where else f"psql exited with status {status}\n") + indent(err), output
        return None, output

    def shell_block(self, block, path):
        lines = block.lines
        if any(line.startswith("$ ") for line in lines):
            # Commands are the prompted lines; the rest is output, kept blank so line numbers still match.
            lines = [line[2:] if line.startswith("$ ") else "" for line in lines]
        offset = block.first - 2  # script line 2 is the block's first line
        prologue = ("set -euo pipefail; trap 's=$?; echo \"readme-test: README line $((LINENO + "
                    f"{offset})): exit status $s\" >&2' ERR")
        with open(path, "w", encoding="utf-8") as f:
            f.write(prologue + "\n" + "\n".join(lines) + "\n")
        status, out, err = run(["bash", path], self.env, self.workdir, BLOCK_TIMEOUT)
        output = out + err
        if status is None:
            return f"the block did not finish within {BLOCK_TIMEOUT} s\n" + indent(out) + indent(err), output
        if block.expect:
            if status == 0:
                return f"expected a failure with SQLSTATE {block.expect}, but the block exited 0\n" + indent(out), output
            if f"SQLSTATE {block.expect}" not in err:
                return f"expected SQLSTATE {block.expect} on standard error, got:\n" + indent(err), output
            return None, output
        if status != 0:
            return f"exit status {status}\n" + indent(out) + indent(err), output
        return None, output


def main():
    parser = argparse.ArgumentParser(description="Runs the README's SQL and CLI examples against a scratch database.")
    parser.add_argument("readme", nargs="?", help="default: README.md of the repository")
    parser.add_argument("--list", action="store_true", help="print each block and whether it runs; connect to nothing")
    parser.add_argument("--keep", action="store_true", help="leave the scratch database (and print its URL)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every block's output")
    options = parser.parse_args()

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    readme = options.readme or os.path.join(root, "README.md")
    name = os.path.relpath(readme)
    if name.startswith(".."):
        name = readme
    try:
        with open(readme, encoding="utf-8") as f:
            blocks = parse(f.read())
    except ReadmeError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 1
    runnable = [b for b in blocks if b.kind != "doc"]

    if options.list:
        for b in runnable:
            state = f"skip ({b.skip})" if b.skip else f"expect-error {b.expect}" if b.expect else "run"
            print(f"{name}:{b.line} {b.label()}: {state}")
        return 0

    binary = os.path.abspath(os.environ.get("DISPATCH_POLICY_BIN") or os.path.join(root, ".build/debug/dispatch-policy"))
    if not os.access(binary, os.X_OK):
        print(f"readme: no dispatch-policy binary at {binary} (set DISPATCH_POLICY_BIN)", file=sys.stderr)
        return 1
    psql = os.environ.get("PSQL") or shutil.which("psql")
    if not psql:
        print("readme: psql is not on PATH (or set PSQL)", file=sys.stderr)
        return 1

    base = dict(os.environ)
    base.pop("DATABASE_URL", None)
    maintenance = base.get("PGDATABASE") or "postgres"
    database = f"readme_{os.getpid()}"
    url = database_url(base, database)

    workdir = tempfile.mkdtemp(prefix="readme-")
    bindir = os.path.join(workdir, ".bin")
    os.mkdir(bindir)
    scratch = os.path.join(workdir, "scratch")  # the shell blocks' working directory
    os.mkdir(scratch)
    with open(os.path.join(bindir, "dispatch-policy"), "w") as f:
        f.write(f'#!/bin/sh\nexec timeout --kill-after=5 {COMMAND_TIMEOUT} "$READMETEST_BIN" "$@"\n')
    os.chmod(os.path.join(bindir, "dispatch-policy"), 0o755)

    env = dict(base, PGDATABASE=database, DATABASE_URL=url, READMETEST_BIN=binary,
               PATH=bindir + os.pathsep + base.get("PATH", ""))
    admin_env = dict(base, PGDATABASE=maintenance)

    def admin_sql(statement):
        return run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", statement], admin_env, workdir, COMMAND_TIMEOUT)

    # SIGTERM (a test's time limit) still drops the database.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    created = False
    failed = []
    ran = skipped = 0
    try:
        admin_sql(f"DROP DATABASE IF EXISTS {database}")
        status, out, err = admin_sql(f"CREATE DATABASE {database} TEMPLATE template0")
        if status != 0:
            print(f"readme: cannot create the scratch database {database}:\n{indent(err)}", file=sys.stderr)
            return 1
        created = True
        status, out, err = run([os.path.join(bindir, "dispatch-policy"), "migrate"], env, workdir, COMMAND_TIMEOUT + 10)
        if status != 0:
            print(f"readme: dispatch-policy migrate failed (status {status}):\n{indent(err)}", file=sys.stderr)
            return 1
        print(f"readme: {len(runnable)} blocks in {name}, run in {database} with {binary}")

        runner = Runner(psql, env, scratch)
        for b in runnable:
            where = f"{name}:{b.line} {b.label()}"
            if b.skip:
                skipped += 1
                print(f"skip  {where}: {b.skip}")
                continue
            started = time.monotonic()
            path = os.path.join(workdir, f"block-{b.line}.{'sql' if b.kind != 'sh' else 'sh'}")
            error, output = runner.shell_block(b, path) if b.kind == "sh" else runner.psql_block(b, path)
            ran += 1
            took = f"{time.monotonic() - started:.1f} s"
            if error:
                failed.append(where)
                print(f"FAIL  {where} ({took}):\n{indent(error)}", flush=True)
            else:
                expect = f", failed with {b.expect} as expected" if b.expect else ""
                print(f"ok    {where} ({took}{expect})", flush=True)
            if options.verbose:
                print(indent(output), end="", flush=True)
    finally:
        if created and not options.keep:
            status, _, err = admin_sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            if status != 0:
                print(f"readme: could not drop {database}:\n{indent(err)}", file=sys.stderr)
        elif created:
            print(f"readme: kept {url}")
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"readme: {ran} blocks ran, {skipped} skipped, {len(failed)} failed")
    if ran == 0:
        print("readme: no block ran: the README or this script's rule has changed", file=sys.stderr)
        return 1
    if failed:
        print("readme: failed: " + ", ".join(failed) + " (a later failure may follow from an earlier one)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
