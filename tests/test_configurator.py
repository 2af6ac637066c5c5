"""configurator.py: files and --key=value override a script's defaults in order, with type rules and errors
that name the offending key (and file); the scripts' --help lists the keys with their comments, and a zero
interval or count is an input error before any work."""
import math
import os

import pytest

from conftest import ROOT, TINY_PRETRAIN, assert_input_error, run_here
from configurator import ConfigError, configure


def defaults():
    # a stand-in for a script's globals(): config keys plus things that are not config
    return {
        "__name__": "__main__",  # dunder: not config
        "_private": 1,  # leading underscore: not config
        "os": os,  # a module: not config
        "sqrt": math.sqrt,  # a function: not config
        "out_dir": "out/pretrain",
        "max_iters": 125_000,
        "lr": 0.002,
        "compile": False,
        "init_from": None,
        "crop": (96, 96, 96),
        "milestones": [10, 20],
        "dtype": "bfloat16",
        "extra": {"a": 1},
    }


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_arguments_returns_all_keys_and_only_keys():
    ns = defaults()
    config = configure(ns, [])
    assert config == {k: v for k, v in defaults().items() if k in config}
    assert set(config) == {"out_dir", "max_iters", "lr", "compile", "init_from", "crop", "milestones",
                           "dtype", "extra"}


def test_cli_overrides_in_place_and_in_returned_dict(capsys):
    ns = defaults()
    config = configure(ns, ["--max_iters=10", "--out_dir=out/x", "--compile=True", "--lr=1e-3"])
    assert ns["max_iters"] == 10 and ns["out_dir"] == "out/x" and ns["compile"] is True and ns["lr"] == 1e-3
    assert config["max_iters"] == 10 and config["out_dir"] == "out/x" and config["init_from"] is None
    assert "overriding max_iters = 10" in capsys.readouterr().out


def test_file_overrides(tmp_path):
    path = write(tmp_path, "# a demo\nmax_iters = 20  # short\nout_dir = 'out/demo'\n_scratch = 3\n")
    ns = defaults()
    config = configure(ns, [path])
    assert ns["max_iters"] == 20 and config["out_dir"] == "out/demo" and "_scratch" not in config


def test_later_argument_wins(tmp_path):
    path = write(tmp_path, "max_iters = 20\nlr = 0.5\n")
    ns = defaults()
    configure(ns, [path, "--max_iters=7"])  # CLI after file: CLI wins
    assert ns["max_iters"] == 7 and ns["lr"] == 0.5
    ns = defaults()
    configure(ns, ["--max_iters=7", path])  # file after CLI: file wins
    assert ns["max_iters"] == 20


def test_none_default_is_settable_and_none_sets_any_key():
    ns = defaults()
    configure(ns, ["--init_from=out/pretrain/ckpt.pt"])
    assert ns["init_from"] == "out/pretrain/ckpt.pt"
    configure(ns, ["--init_from=None", "--max_iters=None"])
    assert ns["init_from"] is None and ns["max_iters"] is None


def test_int_sets_float_but_not_the_reverse():
    ns = defaults()
    configure(ns, ["--lr=1"])
    assert ns["lr"] == 1.0 and type(ns["lr"]) is float
    with pytest.raises(ConfigError, match="max_iters.*int.*float"):
        configure(defaults(), ["--max_iters=1.5"])


def test_tuples_and_lists_parse_into_the_default_container():
    ns = defaults()
    configure(ns, ["--crop=[64,64,32]", "--milestones=(1,2,3)"])
    assert ns["crop"] == (64, 64, 32) and type(ns["crop"]) is tuple
    assert ns["milestones"] == [1, 2, 3] and type(ns["milestones"]) is list
    configure(ns, ["--extra={'b': 2}"])
    assert ns["extra"] == {"b": 2}


def test_str_key_keeps_raw_text_of_a_number_but_a_file_must_be_typed(tmp_path):
    ns = defaults()
    configure(ns, ["--dtype=16", "--out_dir=\"out dir\""])
    assert ns["dtype"] == "16" and ns["out_dir"] == "out dir"  # quotes are literal_eval'd away
    with pytest.raises(ConfigError, match="dtype"):
        configure(defaults(), [write(tmp_path, "dtype = 16\n")])


def test_bool_key_takes_bools_only():
    for bad in ["--compile=1", "--compile=0", "--compile=yes"]:
        with pytest.raises(ConfigError, match="compile.*bool"):
            configure(defaults(), [bad])
    with pytest.raises(ConfigError, match="max_iters"):  # and True is not an int
        configure(defaults(), ["--max_iters=True"])


def test_wrong_type_names_key_expected_and_given():
    with pytest.raises(ConfigError) as e:
        configure(defaults(), ["--crop=96"])
    msg = str(e.value)
    assert "crop" in msg and "tuple" in msg and "int" in msg
    assert isinstance(e.value, ValueError)


def test_unknown_cli_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'max_iter' \(did you mean 'max_iters'\?\)"):
        configure(defaults(), ["--max_iter=10"])
    with pytest.raises(ConfigError, match="unknown config key 'zzz'.*known keys"):
        configure(defaults(), ["--zzz=1"])
    with pytest.raises(ConfigError, match="_private"):  # underscored names are not config
        configure(defaults(), ["--_private=2"])


def test_unknown_file_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "max_iters = 10\nlearning_rat = 0.1\n", name="typo.py")
    with pytest.raises(ConfigError) as e:
        configure(defaults(), [path])
    msg = str(e.value)
    assert "'learning_rat'" in msg and path in msg
    path = write(tmp_path, "out_dirr = 'x'\n", name="typo2.py")
    with pytest.raises(ConfigError, match=r"'out_dirr' in .*typo2\.py \(did you mean 'out_dir'\?\)"):
        configure(defaults(), [path])


def test_missing_file_and_bare_flag_are_errors(tmp_path):
    missing = str(tmp_path / "nope.py")
    with pytest.raises(ConfigError, match="not found.*nope.py"):
        configure(defaults(), [missing])
    with pytest.raises(ConfigError, match="--compile=True"):
        configure(defaults(), ["--compile"])


# ---- the scripts' use of it: --help, values checked before any work ------------------------------------------------

def test_help_lists_the_keys_with_their_comments():
    for name in ("pretrain.py", "finetune_seg.py", "linear_probe.py"):
        p = run_here(ROOT / name, "--help")
        assert p.returncode == 0, p.stderr[-2000:]
        assert "config keys" in p.stdout and "out_dir = " in p.stdout and "threads = 0  # torch CPU threads" in p.stdout


@pytest.mark.parametrize("argv, key", [
    (["pretrain.py", *TINY_PRETRAIN], "log_interval"),
    (["pretrain.py", *TINY_PRETRAIN], "ckpt_interval"),
    (["pretrain.py", *TINY_PRETRAIN], "export_interval"),
    (["finetune_seg.py", "configs/seg_synthetic.py"], "eval_interval"),
    (["finetune_seg.py", "configs/seg_synthetic.py"], "log_interval"),
    (["linear_probe.py", "configs/probe_synthetic.py"], "eval_interval"),
    (["linear_probe.py", "configs/probe_synthetic.py"], "n_runs"),
])
def test_zero_intervals_and_counts_are_input_errors(tmp_path, argv, key):
    """Each used to crash after the set-up (ZeroDivisionError; the probe's n_runs=0: 'need at least one array')."""
    p = run_here(ROOT / argv[0], *argv[1:], "--max_iters=2", f"--{key}=0", f"--out_dir={tmp_path / 'run'}")
    assert_input_error(p, f"{key} must be a positive int, got 0")
    assert not (tmp_path / "run").exists()  # refused before any work: nothing written
