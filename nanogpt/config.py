"""Command-line options: typed dataclasses, safe config files and `--key=value` overrides.

Every command describes its options as a dataclass whose fields carry a default and a one-line
`help`. `parse_args` fills it from, in order: the defaults, config files given as positional
arguments (nanoGPT syntax: `n_layer = 6`, `gradient_accumulation_steps = 5 * 8`), then `--key=value`
overrides (a bare `--flag` sets a True/False option to True). Config files are parsed with `ast` and
evaluated by a tiny interpreter that only knows literals, arithmetic and names assigned earlier in the
same file: nothing in them is ever executed, unlike nanoGPT's `exec`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import operator
import textwrap
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from nanogpt.errors import UserError

T = TypeVar("T")

BUNDLED_CONFIG_DIR = Path(__file__).parent / "configs"


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line description for `--help`."""
    return dataclasses.field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------- options several commands share

# Options that several commands declare alike (sample, eval and serve load a model the same way), written
# once so that their defaults and help cannot drift apart. Each call returns a new field: a dataclass keeps
# its field's name and type on the Field object, so one Field cannot be shared by two classes.


def init_from_option() -> Any:
    """--init_from of the commands that use a trained model (train's also offers 'scratch')."""
    return option(
        "resume", "'resume' (the checkpoint in out_dir), gpt2 / gpt2-medium / gpt2-large / gpt2-xl, or a HF folder"
    )


def out_dir_option(help: str) -> Any:
    """--out_dir, the run's folder ("out" unless told): each command says what it reads or writes there."""
    return option("out", help)


def device_option() -> Any:
    """--device: "auto" picks the fastest there is, so a command runs unchanged on any machine."""
    return option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")


def dtype_option(help: str = "auto, float32, bfloat16 or float16 (as for sampling)") -> Any:
    """--dtype, "auto" unless told; sample's help spells out what auto picks, the others point to it."""
    return option("auto", help)


# ----------------------------------------------------------------------------- config files

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARYOPS = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}


def _eval_node(node: ast.AST, names: dict[str, Any], where: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if node.id in ("True", "False", "None"):  # pragma: no cover - Constant in Python 3.8+
            return {"True": True, "False": False, "None": None}[node.id]
        raise UserError(f"{where}: unknown name '{node.id}'. Only names assigned earlier in the file can be used.")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_node(node.left, names, where), _eval_node(node.right, names, where)
        if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > 64:
            raise UserError(f"{where}: exponent {right} is too large for a config value.")
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int):
            if left.bit_length() * abs(right) > 4096:  # 10**64 is fine, (10**64)**64**... would never finish
                raise UserError(f"{where}: the power is too large for a config value.")
        if isinstance(left, str) != isinstance(right, str) and not isinstance(node.op, ast.Mult):
            raise UserError(f"{where}: cannot combine {type(left).__name__} and {type(right).__name__}.")
        if isinstance(node.op, ast.Mult) and (isinstance(left, str) or isinstance(right, str)):
            raise UserError(f"{where}: repeating strings with '*' is not supported in config files.")
        try:
            return _BINOPS[type(node.op)](left, right)
        except (ArithmeticError, TypeError, ValueError, MemoryError) as e:
            raise UserError(f"{where}: cannot evaluate the expression ({str(e) or type(e).__name__}).") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
        value = _eval_node(node.operand, names, where)
        try:
            return _UNARYOPS[type(node.op)](value)
        except TypeError as e:
            raise UserError(f"{where}: cannot evaluate the expression ({e}).") from None
    kind = type(node).__name__
    hint = " Function calls are not allowed." if isinstance(node, ast.Call) else ""
    raise UserError(
        f"{where}: a config value may only use literals (numbers, strings, True/False/None), + - * / // % ** "
        f"and names assigned earlier; found a {kind}.{hint} Config files are parsed, never executed."
    )


def parse_config_text(text: str, filename: str = "<config>") -> dict[str, Any]:
    """Parse a nanoGPT-style config file into {name: value} without executing it."""
    try:
        tree = ast.parse(text, filename=filename)
    except SyntaxError as e:
        line = f", line {e.lineno}" if e.lineno else ""  # None for e.g. null bytes
        raise UserError(f"{filename}{line}: not valid Python assignment syntax ({e.msg}).") from None
    except ValueError as e:  # e.g. null bytes
        raise UserError(f"{filename}: cannot be parsed as a config file ({e}).") from None
    except (RecursionError, MemoryError):
        raise UserError(f"{filename}: an expression is too deeply nested to be a config value.") from None
    names: dict[str, Any] = {}
    for stmt in tree.body:
        where = f"{filename}, line {stmt.lineno}"
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            continue  # a docstring
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            what = "an import" if isinstance(stmt, (ast.Import, ast.ImportFrom)) else f"a {type(stmt).__name__}"
            raise UserError(
                f"{where}: only simple assignments like 'n_layer = 6' are allowed in config files, found {what}. "
                "Config files are parsed, never executed."
            )
        try:
            names[stmt.targets[0].id] = _eval_node(stmt.value, names, where)
        except (RecursionError, MemoryError):
            raise UserError(f"{where}: the expression is too deeply nested or too large for a config value.") from None
    return names


def read_config_file(path: str) -> dict[str, Any]:
    """Read a config file; a missing path falls back to the config of that name bundled with nanogpt."""
    p = Path(path)
    if not p.is_file():
        bundled = BUNDLED_CONFIG_DIR / p.name
        if bundled.is_file():
            p = bundled
        else:
            available = ", ".join(sorted(f.name for f in BUNDLED_CONFIG_DIR.glob("*.py") if f.name != "__init__.py"))
            raise UserError(f"config file '{path}' does not exist. Bundled configs: {available}.")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file '{path}': {e}.") from None
    return parse_config_text(text, str(path))


# ----------------------------------------------------------------------------- typed values


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_DESCRIPTIONS = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}


def _type_name(tp: Any) -> str:
    """'True or False', 'an integer or None', ...: how --help and errors describe an option's type."""
    args = typing.get_args(tp)
    if args:  # Optional[X]
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or None"
    return _DESCRIPTIONS.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce_plain(tp: Any, value: Any) -> Any:
    """value converted to bool/int/float/str, or raise ValueError."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
    elif tp is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    value = float(value)  # 1e4 is a fine way to write 10000
                except ValueError:
                    pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp not in _DESCRIPTIONS:
        raise TypeError(f"unsupported option type {tp}")  # a bug in an options dataclass
    raise ValueError(value)


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert `value` (a string from the command line, or a config-file value) to the field type."""
    args = typing.get_args(tp)
    if args and (value is None or (isinstance(value, str) and value in ("None", "none"))):
        return None
    try:
        return _coerce_plain(args[0] if args else tp, value)
    except ValueError:
        raise UserError(f"--{name} expects {_type_name(tp)}, got {value!r}.") from None


# ----------------------------------------------------------------------------- the parser


CONFIG_FILES = "[config_file.py ...]"


def format_help(cls: type, prog: str, description: str, positional: str = CONFIG_FILES) -> str:
    lines = [f"usage: {prog} {positional} [--key=value ...]", "", description.strip(), "", "options:"]
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        default = f.default
        lines.append(f"  --{f.name}={default!r}  ({_type_name(types[f.name])})")
        lines.append(textwrap.indent(textwrap.fill(f.metadata.get("help", ""), 88), " " * 6))
    if positional == CONFIG_FILES:
        lines.append("")
        lines.append("Config files use Python assignment syntax (n_layer = 6) and are parsed, never executed;")
        lines.append("a name that is not a path is looked up among the configs bundled with nanogpt.")
    return "\n".join(lines)


def unknown_option(name: str, valid: Sequence[str], where: str) -> UserError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f" Did you mean --{close[0]}?" if close else " Run with --help to list the options."
    return UserError(f"unknown option '{name}' {where}.{hint}")


def parse_args(
    cls: type[T], argv: Sequence[str], prog: str, description: str, positional: str = CONFIG_FILES
) -> tuple[T, set[str]]:
    """Build a `cls` from config files and `--key=value` arguments.

    Returns the options and the set of names the user set explicitly (in a file or on the command
    line), which lets `train` tell "the user asked for n_layer=6" from "n_layer kept its default".
    Prints help and exits for `-h`/`--help`.
    """
    types = _field_types(cls)
    valid = list(types)
    values: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(format_help(cls, prog, description, positional))
            raise SystemExit(0)
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in types:
                raise unknown_option(key, valid, "on the command line")
            if not eq and types[key] is not bool:  # a bare --flag means --flag=True
                raise UserError(f"option '{arg}' has no value. Write it as --{key}=VALUE.")
            values[key] = coerce(key, types[key], raw if eq else True)
        elif arg.startswith("-"):
            raise UserError(f"unrecognised argument '{arg}'. Options are written --key=value; see --help.")
        else:
            for key, value in read_config_file(arg).items():
                if key.startswith("_"):
                    continue
                if key not in types:
                    raise unknown_option(key, valid, f"in config file '{arg}'")
                values[key] = coerce(key, types[key], value)
    return cls(**values), set(values)
