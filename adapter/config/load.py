"""Read an InternEvo config file (Python or YAML) into plain Python values without running it.

InternEvo configs are Python modules that InternEvo executes (``Config.from_file``). Executing a config
you did not write runs arbitrary code, so by default we *evaluate* the small subset of Python that
real configs use, with ``ast``:

* literals, names assigned earlier in the file, ``dict(...)``/``{...}``/lists/tuples,
* arithmetic and comparisons, ``x if c else y``, subscripts of earlier values (``data["total_steps"]``),
* f-strings, ``"sep".join([...])``, ``int``/``float``/``str``/``bool``/``min``/``max``/``abs``/``round``/``len``,
* ``import os`` followed by reads of ``os.environ[...]``, ``os.environ.get(...)`` or ``os.getenv(...)``,
* string statements (docstrings) and comments.

Anything else (other calls, attribute access, loops, function definitions) is refused with a
``ConfigError`` naming ``file:line`` and pointing at ``trust=True`` (``--trust-config`` on the CLI), which
executes the file as InternEvo does. What Python itself refuses (a keyword argument given twice) is refused
too; what it accepts (a UTF-8 byte-order mark) is accepted. YAML files (``.yaml``/``.yml``) with the same
structure are read with ``yaml.safe_load`` semantics. Evaluation is bounded in time and memory
(``bounds``: integer bits, value sizes, nesting, total work), and no message quotes more than a short
excerpt of code.

Every loader records the line where each dotted key is written, so later validation errors can say
``7B_demo.py:58: parallel.zero1: ...``.
"""

from __future__ import annotations

import ast
import operator
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adapter.config.bounds import (MAX_DEPTH, SizeMeter, TooBig, check_binop, check_format_numbers, check_join,
                                   check_round, short)
from adapter.config.errors import ConfigError

TRUST_HINT = "pass --trust-config (trust=True) to execute the file as InternEvo does"

_BIN_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type, Callable[[Any], Any]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Not: operator.not_,
}
_COMPARE_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "min": min,
    "max": max,
    "abs": abs,
    "round": round,
    "len": len,
    "dict": dict,
    "list": list,
    "tuple": tuple,
}


class _Environ:
    """Stands for ``os.environ`` inside the evaluator: only reads are possible."""


class _Os:
    """Stands for the ``os`` module inside the evaluator."""


_ENVIRON = _Environ()
_OS = _Os()


@dataclass
class RawConfig:
    """A loaded config: plain values plus where each dotted key was written.

    Attributes:
        values: top-level names → plain Python values (dicts, lists, numbers, strings, None).
        source: the file it came from (as given by the user).
        lines: dotted key (``"parallel.zero1"``) → 1-based line number, where known.
    """

    values: dict[str, Any]
    source: str
    lines: dict[str, int] = field(default_factory=dict)

    def line_of(self, path: str) -> int | None:
        """The line of ``path`` or of its nearest ancestor that has one."""
        parts = path.split(".")
        while parts:
            line = self.lines.get(".".join(parts))
            if line is not None:
                return line
            parts.pop()
        return None

    def error(self, path: str, message: str) -> ConfigError:
        """A ``ConfigError`` for ``path`` located in this file."""
        return ConfigError(path, message, source=self.source, line=self.line_of(path))


def load_config(path: str | os.PathLike, *, trust: bool = False) -> RawConfig:
    """Load an InternEvo config from a ``.py`` or ``.yaml``/``.yml`` file.

    Args:
        path: the config file.
        trust: execute a Python config instead of evaluating it safely. Only for files you trust.

    Raises:
        ConfigError: the file is missing, unreadable, not valid Python/YAML, or (without ``trust``)
            uses a construct outside the safe subset.
    """
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", "config file not found", source=source)
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark, which Python accepts, is not part of the text
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config: {exc}", source=source) from exc
    if p.suffix.lower() in (".yaml", ".yml"):
        return _load_yaml(text, source)
    if trust:
        return _exec_python(text, source)
    return _SafeEvaluator(source).run(text)


def _load_yaml(text: str, source: str) -> RawConfig:
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError("", f"invalid YAML: {exc}", source=source, line=line) from exc
    except RecursionError:
        raise ConfigError("", "YAML nested deeper than Python can read", source=source) from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError("", "a YAML config must be a mapping of sections", source=source, line=1)
    try:
        SizeMeter().size(values)  # aliases share objects: ten levels of them expand to billions of elements
    except TooBig as exc:
        raise ConfigError("", f"too large to evaluate: {exc}", source=source) from None
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    walk(root, "")
    return RawConfig({str(k): v for k, v in values.items()}, source, lines)


def _exec_python(text: str, source: str) -> RawConfig:
    namespace: dict[str, Any] = {"__file__": source, "__name__": "__internlm_config__"}
    try:
        code = compile(text, source, "exec")
        exec(code, namespace)  # noqa: S102 - the user asked for it with --trust-config
    except SyntaxError as exc:
        raise ConfigError("", f"invalid Python: {exc.msg}", source=source, line=exc.lineno) from exc
    except Exception as exc:  # the config's own code failed; say so without a traceback
        raise ConfigError("", f"executing the config failed: {type(exc).__name__}: {short(str(exc))}", source=source) from exc
    values = {
        k: v
        for k, v in namespace.items()
        if not k.startswith("__")
        and not isinstance(v, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type))
    }
    lines = {}
    tree = ast.parse(text)
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    _record_lines(target.id, stmt.value, lines)
    return RawConfig(values, source, lines)


def _record_lines(path: str, node: ast.AST, lines: dict[str, int]) -> None:
    """Record the line of ``path`` and of the keys of any dict literal/call it is assigned."""
    lines.setdefault(path, node.lineno if hasattr(node, "lineno") else 0)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        for kw in node.keywords:
            if kw.arg is not None:
                lines[f"{path}.{kw.arg}"] = kw.value.lineno
                _record_lines(f"{path}.{kw.arg}", kw.value, lines)
    elif isinstance(node, ast.Dict):
        for key, value in zip(node.keys, node.values):
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                lines[f"{path}.{key.value}"] = key.lineno
                _record_lines(f"{path}.{key.value}", value, lines)


class _SafeEvaluator:
    """Evaluates the config subset described in the module docstring."""

    def __init__(self, source: str):
        self.source = source
        self.names: dict[str, Any] = {}
        self.lines: dict[str, int] = {}
        self.os_imported = False
        self.current = ""
        self.meter = SizeMeter()
        self.depth = 0

    def run(self, text: str) -> RawConfig:
        try:
            tree = ast.parse(text, filename=self.source)
        except SyntaxError as exc:
            raise ConfigError("", f"invalid Python: {exc.msg}", source=self.source, line=exc.lineno) from exc
        except (RecursionError, MemoryError):
            raise ConfigError("", f"an expression nested deeper than Python can read (the evaluator allows "
                              f"{MAX_DEPTH} levels)", source=self.source) from None
        for stmt in tree.body:
            self._statement(stmt)
        values = {k: v for k, v in self.names.items() if not k.startswith("__")}
        return RawConfig(values, self.source, self.lines)

    def _refuse(self, node: ast.AST, what: str) -> ConfigError:
        return ConfigError(
            self.current,
            f"{what} is not allowed in a config loaded safely; {TRUST_HINT}",
            source=self.source,
            line=getattr(node, "lineno", None),
        )

    def _statement(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            return  # a docstring or a bare string used as a comment block
        if isinstance(stmt, ast.Import) and [a.name for a in stmt.names] == ["os"] and stmt.names[0].asname is None:
            self.os_imported = True
            return
        target = None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target = stmt.target
        if isinstance(target, ast.Name):
            self.current = target.id
            _record_lines(target.id, stmt.value, self.lines)
            self.lines[target.id] = stmt.lineno
            self.names[target.id] = self._expr(stmt.value)
            self.current = ""
            return
        kind = type(stmt).__name__
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            kind = "an import other than `import os`"
        elif isinstance(stmt, ast.Assign):
            kind = "an assignment to something other than a single name"
        raise self._refuse(stmt, f"statement `{kind}`")

    def _expr(self, node: ast.expr) -> Any:
        method = getattr(self, f"_eval_{type(node).__name__}", None)
        if method is None:
            raise self._refuse(node, f"expression `{_code(node)}`")
        if self.depth >= MAX_DEPTH:
            raise self._too_big(node, f"expressions nested deeper than {MAX_DEPTH} levels")
        self.depth += 1
        try:
            value = method(node)
            self.meter.size(value)
        except TooBig as exc:
            raise self._too_big(node, str(exc)) from None
        finally:
            self.depth -= 1
        return value

    def _too_big(self, node: ast.AST, what: str) -> ConfigError:
        return ConfigError(self.current, f"too large to evaluate: {what} in `{_code(node)}`", source=self.source,
                           line=getattr(node, "lineno", None))

    # literals and containers
    def _eval_Constant(self, node: ast.Constant) -> Any:
        return node.value

    def _eval_List(self, node: ast.List) -> list:
        return [self._expr(e) for e in node.elts]

    def _eval_Tuple(self, node: ast.Tuple) -> tuple:
        return tuple(self._expr(e) for e in node.elts)

    def _eval_Set(self, node: ast.Set) -> set:
        return {self._expr(e) for e in node.elts}

    def _eval_Dict(self, node: ast.Dict) -> dict:
        out: dict = {}
        for key, value in zip(node.keys, node.values):
            if key is None:  # {**other}
                merged = self._expr(value)
                if not isinstance(merged, dict):
                    raise self._refuse(node, "`**` of a non-dict")
                out.update(merged)
            else:
                out[self._expr(key)] = self._expr(value)
        return out

    def _eval_Name(self, node: ast.Name) -> Any:
        if node.id in self.names:
            return self.names[node.id]
        if node.id == "os" and self.os_imported:
            return _OS
        if node.id in _FUNCTIONS:
            return _FUNCTIONS[node.id]
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        raise ConfigError(
            self.current,
            f"name `{node.id}` is not defined above this line",
            source=self.source,
            line=node.lineno,
        )

    # operators
    def _eval_BinOp(self, node: ast.BinOp) -> Any:
        op = _BIN_OPS.get(type(node.op))
        if op is None:
            raise self._refuse(node, f"operator in `{_code(node)}`")
        left, right = self._expr(node.left), self._expr(node.right)
        check_binop(type(node.op).__name__, left, right, self.meter)
        try:
            return op(left, right)
        except Exception as exc:
            raise ConfigError(
                self.current, f"`{_code(node)}` failed: {short(str(exc))}", source=self.source, line=node.lineno
            ) from exc

    def _eval_UnaryOp(self, node: ast.UnaryOp) -> Any:
        op = _UNARY_OPS.get(type(node.op))
        if op is None:
            raise self._refuse(node, f"operator in `{_code(node)}`")
        try:
            return op(self._expr(node.operand))
        except TypeError as exc:
            raise ConfigError(
                self.current, f"`{_code(node)}` failed: {short(str(exc))}", source=self.source, line=node.lineno
            ) from exc

    def _eval_BoolOp(self, node: ast.BoolOp) -> Any:
        value = self._expr(node.values[0])
        for operand in node.values[1:]:
            if isinstance(node.op, ast.And) and not value:
                return value
            if isinstance(node.op, ast.Or) and value:
                return value
            value = self._expr(operand)
        return value

    def _eval_Compare(self, node: ast.Compare) -> bool:
        left = self._expr(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = self._expr(comparator)
            try:
                if not _COMPARE_OPS[type(op)](left, right):
                    return False
            except TypeError as exc:
                raise ConfigError(
                    self.current, f"`{_code(node)}` failed: {short(str(exc))}", source=self.source, line=node.lineno
                ) from exc
            left = right
        return True

    def _eval_IfExp(self, node: ast.IfExp) -> Any:
        return self._expr(node.body) if self._expr(node.test) else self._expr(node.orelse)

    def _eval_Subscript(self, node: ast.Subscript) -> Any:
        container = self._expr(node.value)
        key = self._expr(node.slice)
        if container is _ENVIRON:
            return self._env(node, key, required=True)
        try:
            return container[key]
        except (KeyError, IndexError, TypeError) as exc:
            raise ConfigError(
                self.current,
                f"`{_code(node)}` failed: {type(exc).__name__}: {short(str(exc))}",
                source=self.source,
                line=node.lineno,
            ) from exc

    def _eval_Slice(self, node: ast.Slice) -> slice:
        parts = [None if n is None else self._expr(n) for n in (node.lower, node.upper, node.step)]
        return slice(*parts)

    def _eval_JoinedStr(self, node: ast.JoinedStr) -> str:
        return "".join(self._expr(v) for v in node.values)

    def _eval_FormattedValue(self, node: ast.FormattedValue) -> str:
        value = self._expr(node.value)
        if node.conversion == ord("r"):
            value = repr(value)
        elif node.conversion == ord("s"):
            value = str(value)
        spec = self._expr(node.format_spec) if node.format_spec is not None else ""
        check_format_numbers(spec)
        try:
            return format(value, spec)
        except (TypeError, ValueError) as exc:
            raise ConfigError(self.current, f"`{_code(node)}` failed: {short(str(exc))}", source=self.source,
                              line=node.lineno) from exc

    def _eval_Attribute(self, node: ast.Attribute) -> Any:
        base = self._expr(node.value)
        if base is _OS and node.attr == "environ":
            return _ENVIRON
        raise self._refuse(node, f"attribute access `{_code(node)}`")

    def _eval_Call(self, node: ast.Call) -> Any:
        func = node.func
        args = []
        for a in node.args:
            if isinstance(a, ast.Starred):
                raise self._refuse(node, f"`*args` in `{_code(node)}`")
            args.append(self._expr(a))
        kwargs: dict[str, Any] = {}
        for kw in node.keywords:
            given = self._expr(kw.value) if kw.arg is None else {kw.arg: self._expr(kw.value)}
            if not isinstance(given, dict):
                raise self._refuse(node, "`**` of a non-dict")
            for key in given:
                if key in kwargs:  # Python refuses this too (a SyntaxError, or a TypeError through **)
                    raise ConfigError(self.current, f"keyword argument {short(str(key))!r} given twice in "
                                      f"`{_code(node)}`", source=self.source, line=node.lineno)
            kwargs.update(given)
        if isinstance(func, ast.Attribute):
            owner = self._expr(func.value)
            if isinstance(owner, str) and func.attr == "join" and len(args) == 1 and not kwargs:
                check_join(owner, args[0], self.meter)
                return self._call(node, owner.join, args, kwargs)
            if owner is _ENVIRON and func.attr == "get" and 1 <= len(args) <= 2 and not kwargs:
                return self._env(node, *args, required=False)
            if owner is _OS and func.attr == "getenv" and 1 <= len(args) <= 2 and not kwargs:
                return self._env(node, *args, required=False)
            raise self._refuse(node, f"call `{_code(node)}`")
        if isinstance(func, ast.Name) and func.id not in self.names and func.id not in _FUNCTIONS:
            raise self._refuse(node, f"call `{_code(node)}`")
        target = self._expr(func)
        if not any(target is f for f in _FUNCTIONS.values()):
            raise self._refuse(node, f"call `{_code(node)}`")
        if target is round:
            check_round(args)
        return self._call(node, target, args, kwargs)

    def _call(self, node: ast.Call, fn: Callable[..., Any], args: list, kwargs: dict) -> Any:
        try:
            return fn(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                self.current, f"`{_code(node)}` failed: {short(str(exc))}", source=self.source, line=node.lineno
            ) from exc

    def _env(self, node: ast.AST, key: Any, default: Any = None, *, required: bool) -> Any:
        if not isinstance(key, str):
            raise self._refuse(node, "a non-string environment variable name")
        if key in os.environ:
            return os.environ[key]
        if required:
            raise ConfigError(
                self.current,
                f"environment variable {key} is not set (the config reads os.environ[{key!r}])",
                source=self.source,
                line=getattr(node, "lineno", None),
            )
        return default



def _code(node: ast.AST) -> str:
    """A short excerpt of ``node``'s source for messages (a literal can be a megabyte long)."""
    try:
        return short(ast.unparse(node))
    except RecursionError:
        return f"<an expression at line {getattr(node, 'lineno', '?')}>"
