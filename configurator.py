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
"""

import ast
import difflib
import os
import re
import resource
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
    and a resume needs the checkpoint. Called before any work, so a mistake costs nothing."""
    if resume:
        if not os.path.exists(os.path.join(out_dir, ckpt)):
            raise ConfigError(f"resume=True but there is no checkpoint {os.path.join(out_dir, ckpt)}")
        return
    found = [f for f in run_files if os.path.exists(os.path.join(out_dir, f))]
    if found and not overwrite:
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(found)}): continue it with --resume=True, "
                          f"replace it with --overwrite=True, or choose another --out_dir")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"out_dir {out_dir} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(out_dir if os.path.isdir(out_dir) else parent, os.W_OK):
        raise ConfigError(f"out_dir {out_dir} is not writable")


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
