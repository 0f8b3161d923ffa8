"""nanogpt.config: config files are parsed, never executed; --key=value options are typed and checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanogpt.config import BUNDLED_CONFIG_DIR, option, parse_args, parse_config_text, read_config_file
from nanogpt.errors import UserError
from nanogpt.train_options import TrainOptions


@dataclasses.dataclass
class Opts:
    n_layer: int = option(12, "number of layers")
    n_embd: int = option(768, "width")
    learning_rate: float = option(6e-4, "peak learning rate")
    compile: bool = option(True, "torch.compile")
    dataset: str = option("openwebtext", "dataset name")
    top_k: Optional[int] = option(200, "top k or None")


def parse(*argv: str) -> tuple[Opts, set[str]]:
    return parse_args(Opts, list(argv), "prog", "A test program.")


# ----------------------------------------------------------------------------- config text


def test_parse_config_text_nanogpt_syntax():
    text = '''"""a docstring is allowed"""
# a comment
n_layer = 6  # trailing comment
gradient_accumulation_steps = 5 * 8
dataset = 'shakespeare_char'
wandb_run_name = "mini" + "-gpt"
always_save_checkpoint = False
compile = True
top_k = None
learning_rate = 1e-3
min_lr = learning_rate / 10
batch_size = 2 ** 6
neg = -3
rest = 17 % 5 + 17 // 5
flag = not True
'''
    assert parse_config_text(text) == {
        "n_layer": 6,
        "gradient_accumulation_steps": 40,
        "dataset": "shakespeare_char",
        "wandb_run_name": "mini-gpt",
        "always_save_checkpoint": False,
        "compile": True,
        "top_k": None,
        "learning_rate": 1e-3,
        "min_lr": 1e-4,
        "batch_size": 64,
        "neg": -3,
        "rest": 5,
        "flag": False,
    }


def test_later_assignments_override_earlier_ones():
    assert parse_config_text("a = 1\nb = a + 1\na = 10\nc = a * b\n") == {"a": 10, "b": 2, "c": 20}


def test_bundled_shakespeare_config_parses():
    values = read_config_file(str(BUNDLED_CONFIG_DIR / "train_shakespeare_char.py"))
    assert values["dataset"] == "shakespeare_char"
    assert (values["n_layer"], values["n_head"], values["n_embd"], values["block_size"]) == (6, 6, 384, 256)


def test_function_call_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "X"
    text = f"n_layer = 6\nx = __import__('os').system('touch {marker}')\n"
    with pytest.raises(UserError, match="Function calls are not allowed"):
        parse_config_text(text, "evil.py")
    assert not marker.exists()


def test_bare_call_statement_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "Y"
    with pytest.raises(UserError, match="line 1"):
        parse_config_text(f"open({str(marker)!r}, 'w')\n")
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("import os\n", "an import"),
        ("from os import path\n", "an import"),
        ("x = os.path\n", "Attribute"),
        ("f = lambda: 1\n", "Lambda"),
        ("x = [1, 2]\n", "List"),
        ("x = {'a': 1}\n", "Dict"),
        ("x = 'a'[0]\n", "Subscript"),
        ("x = f'{1}'\n", "JoinedStr"),
        ("x = 1 if True else 2\n", "IfExp"),
        ("x = 1 << 3\n", "BinOp"),
        ("x = b'bytes'\n", "Constant"),
        ("x = 1j\n", "Constant"),
        ("a, b = 1, 2\n", "Assign"),
        ("x = y = 1\n", "Assign"),
        ("x += 1\n", "AugAssign"),
        ("def f():\n    pass\n", "FunctionDef"),
        ("for i in range(3):\n    x = i\n", "For"),
        ("x = y\n", "unknown name 'y'"),
        ("x = 'a' * 3\n", "repeating strings"),
        ("x = 'a' + 1\n", "cannot combine"),
        ("x = 1 / 0\n", "cannot evaluate"),
        ("x = 2 ** 1000\n", "too large"),
        ("x = -'a'\n", "cannot evaluate"),
        ("x = = 1\n", "not valid Python"),
        ("x = 1\x00\n", "null bytes"),
        ("x = " + "-" * 2000 + "1\n", "too deeply nested"),  # deeper than Python's recursion limit
        ("x = " + "-" * 20000 + "1\n", "too deeply nested"),  # deeper than the parser's own limit
        ("x = 9 ** 64\ny = x ** 64\n", "too large"),  # each power is small, the result is not
    ],
)
def test_parse_config_text_rejects(text, fragment):
    with pytest.raises(UserError) as info:
        parse_config_text(text, "cfg.py")
    assert fragment in str(info.value)
    assert "cfg.py" in str(info.value)
    assert "line None" not in str(info.value)


def test_error_names_the_line():
    with pytest.raises(UserError, match=r"cfg\.py, line 3"):
        parse_config_text("a = 1\nb = 2\nimport sys\n", "cfg.py")


CONFIG_LIKE = st.lists(
    st.sampled_from(
        [
            "a",
            "b",
            "x",
            "=",
            " ",
            "\n",
            "1",
            "0",
            "2.5",
            "-",
            "+",
            "*",
            "/",
            "//",
            "%",
            "**",
            "(",
            ")",
            "'s'",
            '"t"',
            "True",
            "None",
            "not",
            "#",
            "import",
            "os",
            ".",
            ",",
            "[",
            "]",
            "lambda",
            ":",
            "\x00",
            "\\",
            "\t",
            "1e308",
            "64",
            "65",
            "if",
            "else",
            "'%s'",
            "'%d'",
        ]
    ),
    max_size=30,
).map("".join)


@pytest.mark.filterwarnings("ignore::SyntaxWarning")  # Python warns about e.g. '1if' while parsing
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), CONFIG_LIKE))
def test_parse_config_text_only_returns_a_dict_or_raises_user_error(text):
    try:
        result = parse_config_text(text)
    except UserError as e:
        assert str(e)
    else:
        assert isinstance(result, dict)
        assert all(isinstance(k, str) for k in result)


# ----------------------------------------------------------------------------- parse_args


def test_defaults_and_explicit_set():
    opts, explicit = parse()
    assert opts == Opts()
    assert explicit == set()
    opts, explicit = parse("--n_layer=3", "--dataset=tiny")
    assert (opts.n_layer, opts.dataset) == (3, "tiny")
    assert explicit == {"n_layer", "dataset"}


@pytest.mark.parametrize(
    "arg, field, value",
    [
        ("--compile=False", "compile", False),
        ("--compile=false", "compile", False),
        ("--compile=0", "compile", False),
        ("--compile=True", "compile", True),
        ("--compile=yes", "compile", True),
        ("--n_layer=8", "n_layer", 8),
        ("--n_layer=1_000", "n_layer", 1000),
        ("--n_layer=4.0", "n_layer", 4),
        ("--learning_rate=1e-3", "learning_rate", 1e-3),
        ("--learning_rate=3", "learning_rate", 3.0),
        ("--top_k=None", "top_k", None),
        ("--top_k=5", "top_k", 5),
        ("--dataset=True", "dataset", "True"),  # a str option keeps the text as written
        ("--n-layer=2", "n_layer", 2),  # dashes work like underscores
    ],
)
def test_values_are_coerced_to_the_field_type(arg, field, value):
    opts, _ = parse(arg)
    got = getattr(opts, field)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "arg, fragment",
    [
        ("--n_layer=abc", "--n_layer expects an integer"),
        ("--n_layer=4.5", "--n_layer expects an integer"),
        ("--n_layer=True", "--n_layer expects an integer"),
        ("--compile=maybe", "--compile expects True or False"),
        ("--learning_rate=fast", "--learning_rate expects a number"),
        ("--top_k=many", "--top_k expects"),
        ("--n_layer", "has no value"),
        ("-n", "unrecognised argument"),
    ],
)
def test_bad_values_name_the_option(arg, fragment):
    with pytest.raises(UserError, match=fragment):
        parse(arg)


def test_max_iters_type_error_on_the_real_train_options():
    with pytest.raises(UserError, match="--max_iters expects an integer, got 'abc'"):
        parse_args(TrainOptions, ["--max_iters=abc"], "train", "")
    opts, _ = parse_args(TrainOptions, ["--compile=False"], "train", "")
    assert opts.compile is False


def test_unknown_option_suggests_the_closest():
    with pytest.raises(UserError) as info:
        parse_args(TrainOptions, ["--n_embed=5"], "train", "")
    assert "--n_embd" in str(info.value)
    assert "n_embed" in str(info.value)
    with pytest.raises(UserError, match="--help"):  # nothing close: point at --help
        parse("--zzzzzz=1")


def test_unknown_key_in_config_file_is_rejected(tmp_path):
    cfg = tmp_path / "my_config.py"
    cfg.write_text("n_layer = 4\nn_embed = 256\n")
    with pytest.raises(UserError) as info:
        parse_args(TrainOptions, [str(cfg)], "train", "")
    message = str(info.value)
    assert "n_embed" in message and "my_config.py" in message and "--n_embd" in message


def test_config_file_values_are_type_checked(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 'six'\n")
    with pytest.raises(UserError, match="--n_layer expects an integer"):
        parse(str(cfg))


def test_private_names_in_config_files_are_helpers(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("_width = 64\nn_embd = _width * 2\n")
    opts, explicit = parse(str(cfg))
    assert opts.n_embd == 128
    assert explicit == {"n_embd"}


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(TrainOptions, ["--n_layer=2", "--help"], "python train.py", "Train a GPT.")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python train.py" in out
    assert "Train a GPT." in out
    for field in dataclasses.fields(TrainOptions):
        assert f"--{field.name}={field.default!r}" in out, field.name
        assert field.metadata["help"].split()[0] in out


def test_short_help_flag(capsys):
    with pytest.raises(SystemExit) as info:
        parse("-h")
    assert info.value.code == 0
    assert "--top_k=200" in capsys.readouterr().out


def test_later_arguments_override_earlier_ones(tmp_path):
    first = tmp_path / "first.py"
    first.write_text("n_layer = 2\nn_embd = 64\ndataset = 'a'\n")
    second = tmp_path / "second.py"
    second.write_text("n_layer = 3\n")
    opts, _ = parse(str(first), "--n_layer=7", str(second), "--dataset=b", "--dataset=c")
    assert (opts.n_layer, opts.n_embd, opts.dataset) == (3, 64, "c")
    opts, _ = parse(str(first), str(second), "--n_layer=9")
    assert opts.n_layer == 9


def test_bundled_config_fallback_by_file_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config/ folder here
    assert not Path("config/train_shakespeare_char.py").exists()
    opts, explicit = parse_args(TrainOptions, ["config/train_shakespeare_char.py"], "train", "")
    assert opts.dataset == "shakespeare_char"
    assert opts.n_embd == 384 and opts.max_iters == 5000
    assert {"dataset", "n_embd", "max_iters"} <= explicit
    opts, _ = parse_args(TrainOptions, ["train_shakespeare_char.py"], "train", "")
    assert opts.dataset == "shakespeare_char"


def test_a_local_config_file_wins_over_the_bundled_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("config").mkdir()
    Path("config/train_shakespeare_char.py").write_text("n_layer = 1\n")
    opts, _ = parse_args(TrainOptions, ["config/train_shakespeare_char.py"], "train", "")
    assert opts.n_layer == 1 and opts.dataset == "openwebtext"


def test_missing_config_file_lists_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        parse("config/nope.py")
    assert "config/nope.py" in str(info.value) and "train_shakespeare_char.py" in str(info.value)


def test_unreadable_config_file(tmp_path):
    cfg = tmp_path / "latin1.py"
    cfg.write_bytes(b"dataset = '\xe9'\n")
    with pytest.raises(UserError, match="cannot read config file"):
        parse(str(cfg))


def test_train_options_validation_messages():
    with pytest.raises(UserError, match="not divisible by --n_head=4"):
        parse_args(TrainOptions, ["--n_embd=30", "--n_head=4"], "train", "")
    with pytest.raises(UserError, match="--batch_size must be a positive integer"):
        parse_args(TrainOptions, ["--batch_size=0"], "train", "")
    with pytest.raises(UserError, match="--dropout"):
        parse_args(TrainOptions, ["--dropout=1.5"], "train", "")
