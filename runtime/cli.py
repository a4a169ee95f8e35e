"""The one user-error path of every command of the project (torch-free: the runtime uses it, and so
do ``imram_min``'s and ``export``'s commands).

A user error (a missing or malformed file, a bad flag, bad input) ends a command with one line
``error: ...`` on stderr and exit status 2: never a traceback. Tracebacks are left to genuine
bugs. SIGTERM and SIGHUP unwind the program like Ctrl-C, so that every ``finally`` runs and no
temporary file is left behind (``runtime.atomic`` removes its own on every exit path).

    def main(argv=None) -> int:
        return cli.run(_main, argv)          # _main(argv) raises cli.UserError(...) on bad input
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import sys
import time
import warnings
from typing import Callable, Sequence

USAGE = 2  # exit status of every user error
INTERRUPTED = 130


class UserError(ValueError):
    """Anything the user can fix. Its message is printed as one line: name the file or flag and
    what was expected."""


def one_line(message: object) -> str:
    """The message on one line, control characters (terminal escape codes among them) shown escaped."""
    return printable(" ".join(str(message).split()))


def printable(text: str) -> str:
    """``text`` with control characters (ESC, CR, BEL, ...) written as escapes, so that echoing user
    input (a caption, a file name) cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error: PROG: ...`` line and exit status 2 (no usage block)."""

    def error(self, message: str):
        print(f"error: {self.prog}: {one_line(message)}", file=sys.stderr)
        sys.exit(USAGE)

    def check_output_file(self, path: str | os.PathLike | None, flag: str, overwrite: bool) -> None:
        """For a script not run through ``run`` (the benchmarks): ``check_output_file`` of an optional
        output, its refusal as this parser's one error line and exit status 2."""
        if path is not None:
            try:
                check_output_file(path, (), flag, overwrite=overwrite)
            except UserError as e:
                self.error(str(e))


class _Terminated(BaseException):
    """Raised by the SIGTERM / SIGHUP handler: unwinds like KeyboardInterrupt."""


def _raise_terminated(signum, _frame):
    raise _Terminated(signum)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
        user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Call ``main(argv)``; turn a user error into one stderr line and exit status 2.

    user_errors: more exception classes that mean bad input (besides UserError). A full disk
    (ENOSPC, EDQUOT) and an unreadable or unwritable path are user errors too. Warnings from the
    libraries (numpy, Pillow, onnxruntime) are not printed: what matters to the user is checked and
    reported as an error line.
    """
    handlers = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            handlers[sig] = signal.signal(sig, _raise_terminated)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            status = main(argv)
        return 0 if status is None else int(status)
    except (UserError, *user_errors) as e:
        return _fail(e)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return _fail(f"no space left on the device{_where(e)}; nothing was written")
        if e.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR, errno.ENOTDIR, errno.EROFS, errno.EPERM) \
                and e.filename is not None:
            return _fail(f"{e.strerror}: {e.filename}")
        if e.errno == errno.EPIPE or isinstance(e, BrokenPipeError):
            _quiet_stdout()
            return 1
        raise
    except MemoryError:
        return _fail("out of memory: use smaller inputs")
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    except _Terminated as e:
        signum = e.args[0]
        print(f"error: stopped by signal {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _where(e: OSError) -> str:
    return f" writing {e.filename}" if e.filename else ""


def _fail(message: object) -> int:
    print("error: " + one_line(message), file=sys.stderr)
    return USAGE


def _quiet_stdout() -> None:
    """After a broken pipe (``| head``) Python would complain while flushing stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------- paths
def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` are one file (the same path, a hard link, or a symlink to it)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output_file(path: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), flag: str = "--output",
                      overwrite: bool | None = None) -> str:
    """Refuse an output path that is (or links to) one of ``inputs``, is a folder, or whose folder is
    missing or not writable; with ``overwrite=False`` (the command has --overwrite and it was not
    given) also one that already exists (``refuse_replacing``). Returns the path. Raises UserError."""
    path = os.fspath(path)
    for src in inputs:
        if src is not None and os.path.exists(src) and same_file(path, src):
            raise UserError(f"{flag} {path} is the input {os.fspath(src)}: refusing to overwrite an input")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path}: the folder {folder} is not writable")
    if overwrite is False and os.path.lexists(path):
        refuse_replacing(flag, path)
    return path


def refuse_replacing(flag: str, path: str | os.PathLike, held: Sequence[str] = ()) -> None:
    """THE refusal of every command that would replace an existing output without --overwrite:
    one line naming it. ``held``: for a folder, the names of the outputs it already holds.
    Raises UserError."""
    path = os.fspath(path)
    if not held:
        raise UserError(f"{flag} {path} already exists: add --overwrite to replace it")
    names = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
    raise UserError(f"{flag} {path} already holds {names}: give another folder, or add --overwrite to replace "
                    f"{'it' if len(held) == 1 else 'them'}")


def check_count(value: int, flag: str, low: int = 1, high: int | None = None) -> int:
    """An integer flag within [low, high]; raises UserError otherwise."""
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise UserError(f"{flag} must be {bound}, got {value}")
    return value


# --------------------------------------------------------------------------- commands that return a result
def call(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None,
         user_errors: tuple[type[BaseException], ...] = ()):
    """``run`` for a command whose ``main`` returns a result (a dict that notebooks and tests use):
    the result on success; after the one error line, ``SystemExit(status)``. Run as a script
    (``python -m ...``) the exit status is then 0 or the error's status."""
    box = []

    def keep(args):
        box.append(main(args))

    status = run(keep, argv, user_errors)
    if status:
        raise SystemExit(status)
    return box[0] if box else None


def check_outputs_distinct(outputs: Sequence[tuple[str, str | os.PathLike | None]],
                           inputs: Sequence[str | os.PathLike | None] = ()) -> None:
    """Each (flag, path) output is none of ``inputs`` (same path, hard link, symlink) and no two
    outputs are the same file. Raises UserError."""
    given = [(flag, os.fspath(path)) for flag, path in outputs if path is not None]
    for flag, path in given:
        for src in inputs:
            if src is not None and os.path.exists(src) and os.path.exists(path) and same_file(path, src):
                raise UserError(f"{flag} {path} is the input {os.fspath(src)}: refusing to overwrite an input")
            if src is not None and os.path.abspath(path) == os.path.abspath(os.fspath(src)):
                raise UserError(f"{flag} {path} is the input {os.fspath(src)}: refusing to overwrite an input")
    for i, (flag_a, a) in enumerate(given):
        for flag_b, b in given[i + 1:]:
            if os.path.abspath(a) == os.path.abspath(b) or \
                    (os.path.exists(a) and os.path.exists(b) and same_file(a, b)):
                raise UserError(f"{flag_a} and {flag_b} are the same file {a}: give two different names")


def check_output_folder(path: str | os.PathLike, flag: str = "--out", overwrite: bool | None = None,
                        outputs: Sequence[str] = ()) -> str:
    """A folder to write into: an existing folder, or a new one whose nearest existing parent is a
    writable folder. Nothing is created. With ``overwrite=False`` (the command has --overwrite and
    it was not given) an existing folder that already holds one of ``outputs`` (names inside it) is
    refused, naming them (``refuse_replacing``). Raises UserError."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; expected a folder (an existing one, or a new one to create)")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: {probe} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the folder {probe} is not writable")
    if overwrite is False and os.path.isdir(path):
        held = [name for name in outputs if os.path.lexists(os.path.join(path, name))]
        if held:
            refuse_replacing(flag, path, held)
    return path


# --------------------------------------------------------------------------- progress and output lines
class Progress:
    """A small tqdm-like bar on stderr: redrawn in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, desc: str, stream=None, enabled: bool = True):
        self.desc, self.stream, self.enabled = desc, stream or sys.stderr, enabled
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = self.last = time.perf_counter()
        self.done, self.total, self.drawn = 0, 0, False

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        now = time.perf_counter()
        if self.enabled and (now - self.last >= (0.1 if self.tty else 10.0) or done == total):
            self.last = now
            self._draw(end="\n" if done == total or not self.tty else "")

    def _draw(self, end: str) -> None:
        elapsed = time.perf_counter() - self.start
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(20 * frac) + " " * (20 - int(20 * frac))
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (f"{self.desc}: {100 * frac:3.0f}%|{bar}| {self.done}/{self.total} blocks "
                f"[{_clock(elapsed)}<{_clock(left)}, {rate:.1f} blocks/s]")
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()
        self.drawn = end == ""

    def close(self) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029]")  # json.dumps escapes only \x00-\x1f


def json_line(obj) -> str:
    """One exact JSON line, with every control character (C0, DEL, C1) and line separator escaped."""
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False)) + "\n"


def note_unknown_words(unknown: dict[int, list[str]], texts: list[str], what: str, first: int = 0) -> None:
    """One "note:" line on stderr per caption with words the vocabulary lacks (it is still scored:
    such words are read as <unk>, as in training). unknown: {index in texts: words}; first: the
    number of texts[0] in the messages."""
    for i, words in unknown.items():
        text = texts[i] if len(texts[i]) <= 60 else texts[i][:57] + "..."
        print(printable(f"note: {what} {first + i} ({text!r}): the model's vocabulary lacks "
                        f"{', '.join(words)}; read as <unk>"), file=sys.stderr)
