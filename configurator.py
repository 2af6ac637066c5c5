"""
Poor man's configurator, after nanoGPT's, with its sharp edges filed off. A script declares its defaults as
plain module-level assignments and then hands its globals to `configure`:

    out_dir = "out/pretrain"   # every default is the paper's setting
    max_iters = 125_000
    init_from = None
    # -----------------------------------------------------------------------------
    from configurator import configure
    config = configure(globals(), sys.argv[1:])  # overrides globals() in place, returns {key: value}

    $ python pretrain.py configs/pretrain_demo.py --batch_size=2 --lr=1e-3 --out_dir=out/demo

Arguments are applied left to right, so a later one wins (`file.py --lr=1` beats the file's lr):
- `path.py`      a config file of plain assignments, exec'd in a fresh namespace. Every name it defines that
                 does not start with `_` must be a known key, so a typo in a file is an error, not a no-op.
- `--key=value`  `value` is parsed with `ast.literal_eval` (numbers, None, True, tuples, lists, dicts, quoted
                 strings); when that fails the raw text is kept, so `--out_dir=out/x` needs no quotes.
A bare `--key` is an error: write `--compile=True`. (Accepting it for bools invites `--compile False`, which
would then read "False" as a config file.)

The keys are the names in the namespace that do not start with `_` and hold an int/float/bool/str/None/
tuple/list/dict; modules, functions and classes are not config. A new value must have the default's type,
with these exceptions, chosen because they are what one means on a command line:
- an int sets a float key (converted: `--lr=1` gives 1.0); never the other way round;
- a None default takes any value, and any key takes None (`--init_from=None`);
- a tuple or list sets a tuple or list key, converted to the default's container (`--crop=[64,64,64]` gives
  a tuple); the elements are not checked;
- a str key keeps the raw command-line text when it parses as something else (`--dtype=16` is "16"); in a
  config file the types are written explicitly, so `dtype = 16` there is an error;
- a bool key takes True/False only, never 0/1 (an int there is far more often a mistake than a wish).
Every problem raises `ConfigError` (a ValueError) that names the key, and the file if there is one.
`-h` / `--help` lists the keys with their defaults and comments and exits. Once `configure` has run, an input
error (an exception class with `input_error = True`: ConfigError, data.VolumeError) ends the script with its
message alone and exit code 1; a traceback is printed only for what is a bug.

The run folder's guards live here too, one line each in the three training scripts: `check_out_dir` (no run is
overwritten by mistake), `hold_out_dir` (one writer per folder; torchrun workers die with their launcher) and
`save_atomic` (every checkpoint, export and result file: whole or not at all; a full disk says so).
"""

import ast
import atexit
import difflib
import errno
import fcntl
import os
import re
import resource
import signal
import socket
import subprocess
import sys

_CONFIG_TYPES = (bool, int, float, str, type(None), tuple, list, dict)


class ConfigError(ValueError):
    """A bad command line or config file: unknown key, wrong type, missing file, a bad value."""

    input_error = True  # printed without a traceback (see _excepthook)


def _excepthook(kind, exc, tb, _default=sys.excepthook):
    if getattr(kind, "input_error", False):
        print(f"error: {exc}", file=sys.stderr)  # the message says what is wrong; a traceback would bury it
    else:
        _default(kind, exc, tb)


def print_help(namespace: dict, defaults: dict) -> None:
    """The script's docstring, then one line per key: name = default  # the comment on its line in the script."""
    source = open(namespace["__file__"]).read() if namespace.get("__file__") else ""
    doc = (namespace.get("__doc__") or "").strip()
    if doc:
        print(doc.split("\n\n")[0] + "\n")
    print("config keys (set with --key=value, or in a config file of plain assignments):")
    for key, value in defaults.items():
        m = re.search(rf"^\s*{re.escape(key)}\s*=.*?#\s?(.*)$", source, re.M)
        print(f"  {key} = {value!r}" + (f"  # {m.group(1)}" if m else ""))


def check_out_dir(out_dir: str, resume: bool, overwrite: bool, run_files, ckpt: str) -> None:
    """Refuse to write a run into a folder that already holds one, unless resuming or overwriting on purpose;
    and a resume needs the checkpoint. Called before any work, so a mistake costs nothing. `ckpt` = "" for a
    script that cannot resume. A folder whose only trace is a log.jsonl of its config line (a run that failed
    before its first step) holds nothing to keep or resume: it is reused, with a note."""
    if not str(out_dir).strip():
        raise ConfigError("out_dir is empty: give the run a folder, e.g. --out_dir=out/run1")
    if resume:
        if not os.path.exists(os.path.join(out_dir, ckpt)):
            raise ConfigError(f"resume=True but there is no checkpoint {os.path.join(out_dir, ckpt)}")
        return
    found = [f for f in run_files if os.path.exists(os.path.join(out_dir, f))]
    if found == ["log.jsonl"] and ckpt and not overwrite:
        with open(os.path.join(out_dir, "log.jsonl"), errors="replace") as f:
            n_lines = sum(1 for line in f if line.strip())
        if n_lines <= 1:
            print(f"note: {out_dir} holds only the log of a run that failed before its first step; starting afresh")
            found = []
    if found and not overwrite:
        has_ckpt = ckpt and os.path.exists(os.path.join(out_dir, ckpt))
        advice = "continue it with --resume=True, " if has_ckpt else ""
        why = "" if has_ckpt or not ckpt else f"; it saved no checkpoint ({ckpt}), so there is nothing to resume"
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(found)}){why}: {advice}replace it with "
                          f"--overwrite=True, or choose another --out_dir")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"out_dir {out_dir} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(out_dir if os.path.isdir(out_dir) else parent, os.W_OK):
        raise ConfigError(f"out_dir {out_dir} is not writable")


_held = {}  # out_dir -> the open lock file: the lock lasts as long as this process (the OS drops it at exit)


def hold_out_dir(out_dir: str, rank: int = -1):
    """One writer per run folder. rank: the torchrun RANK (-1 without torchrun).

    The master process (rank -1 or 0) takes an exclusive flock on out_dir/.lock and writes its pid and host there
    for as long as it lives; a second writer (a `--resume=True` while the run still goes on, a second start in
    the same folder) is refused with the owner's pid and host. The OS drops a flock when its process dies, so a
    killed run leaves no lock behind: its .lock file is taken over with a note. Under torchrun (rank >= 0) every
    process also asks Linux to send it SIGTERM when its launcher dies (PR_SET_PDEATHSIG): killing torchrun alone
    would otherwise leave the workers training and writing checkpoints. Returns the function that lets go (it
    also runs at exit)."""
    if not str(out_dir).strip():
        raise ConfigError("out_dir is empty: give the run a folder, e.g. --out_dir=out/run1")
    if rank >= 0:
        _die_with_parent()
    if rank > 0:
        return lambda: None
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"out_dir {out_dir} exists and is not a folder")
    made = not os.path.exists(out_dir)
    path = os.path.join(out_dir, ".lock")
    while True:
        try:
            os.makedirs(out_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"out_dir {out_dir}: cannot create its lock file {path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {owner[0]} on host {owner[1]}" if len(owner) >= 2 else "another process"
            raise ConfigError(f"{out_dir} is in use: a run ({who}) is writing there now (lock {path}). Stop it "
                              f"first (a torchrun run: stop the launcher), or choose another --out_dir") from None
        try:  # the previous owner may have removed the file between our open and our flock: lock the one there
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    old = os.read(fd, 200).decode(errors="replace").split()
    if len(old) >= 2 and old[0] != str(os.getpid()):
        print(f"note: {path}: taking over the lock of pid {old[0]} on host {old[1]} (no longer running)")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError:  # a full disk: the flock holds all the same, only the owner's name is missing
        pass
    _held[out_dir] = fd

    def release():  # a clean exit leaves no .lock; a folder made only for it is removed again
        if _held.get(out_dir) != fd:
            return
        try:
            os.unlink(path)  # while still locked: a waiting writer then finds its file gone and retries
            if made and not os.listdir(out_dir):
                os.rmdir(out_dir)
        except OSError:
            pass
        os.close(_held.pop(out_dir))

    atexit.register(release)
    return release


def _die_with_parent() -> None:
    """SIGTERM this process when its parent (the torchrun launcher) dies: Linux prctl(PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


class DiskFullError(OSError):
    """No space left while saving: the message names the file and says the previous one is intact."""

    input_error = True  # printed without a traceback: the disk, not the code, is the problem


def save_atomic(obj, path, write=None) -> None:
    """Write `obj` to `path` all at once or not at all: into path.tmp<pid>, then rename over `path`. Readers (and
    a resumed run) never see a half-written file; whatever goes wrong, the previous file at `path` is left as it
    was and the temp file is removed. write(obj, f) writes to the open binary file; default torch.save.
    A full disk raises DiskFullError naming the file, not the writer's cryptic message (torch's own file writer
    reports it as "[enforce fail at inline_container.cc] unexpected pos")."""
    if write is None:
        import torch

        write = torch.save
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(obj, f)
        os.replace(tmp, path)  # only after the close: a full disk shows by then at the latest
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if _no_space(e):
            before = f"the previous {path} is intact" if os.path.exists(path) else f"there was no previous {path}"
            raise DiskFullError(errno.ENOSPC, f"no space left on device writing {path}; {before}") from e
        raise


def _no_space(e: BaseException) -> bool:
    """Is ENOSPC anywhere in the exception chain (a writer may re-raise a failed write as another error)?"""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def git_sha() -> str | None:
    """The repository's commit, for the first log line of every run (None outside a git checkout)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                       stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return None


def peak_rss_mb() -> int:
    """Peak resident memory of this process in MB, for every log row."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return round(kb / (1024 ** 2 if sys.platform == "darwin" else 1024))


def _unknown(key: str, known: dict, where: str = "") -> ConfigError:
    # difflib finds the closest known key, so `--max_iter=10` says what it should have been
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(known))})"
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def _coerce(key: str, default, value, where: str = ""):
    """Return `value` converted to the type of `default`, or raise ConfigError (rules in the module docstring)."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):  # before int: bool is a subclass of int, and True must not set an int key
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list))
        value = type(default)(value) if ok else value
    else:  # str, dict
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"config key '{key}'{where} expects {type(default).__name__} "
                          f"(default {default!r}), got {type(value).__name__} {value!r}")
    return value


def configure(namespace: dict, argv: list[str]) -> dict:
    """Apply config files and `--key=value` items of `argv` to `namespace` in place; return {key: value}."""
    defaults = {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, _CONFIG_TYPES)}
    if "-h" in argv or "--help" in argv:
        print_help(namespace, defaults)
        sys.exit(0)
    sys.excepthook = _excepthook

    def apply(key, value, where=""):
        if key not in defaults:
            raise _unknown(key, defaults, where)
        namespace[key] = _coerce(key, defaults[key], value, where)
        print(f"overriding {key} = {namespace[key]!r}")

    for arg in argv:  # in order, so a later argument wins
        if not arg.startswith("--"):
            # ---- a config file: plain assignments, exec'd in a fresh namespace ----
            if not os.path.isfile(arg):
                raise ConfigError(f"config file not found: '{arg}'")
            print(f"applying config file {arg}")
            with open(arg) as f:
                file_ns = {}
                exec(compile(f.read(), arg, "exec"), file_ns)
            for key, value in file_ns.items():
                if not key.startswith("_"):  # also skips the __builtins__ that exec adds
                    apply(key, value, f" in {arg}")
            continue
        # ---- a --key=value item ----
        if "=" not in arg:
            raise ConfigError(f"'{arg}' has no value: write {arg}=value (for a flag, {arg}=True)")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise _unknown(key, defaults)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):  # not a Python literal: a path, a name, a word
            value = text
        if isinstance(defaults[key], str) and not isinstance(value, (str, type(None))):
            value = text  # `--dtype=16` on a str key means the string "16"
        apply(key, value)
    return {k: namespace[k] for k in defaults}
