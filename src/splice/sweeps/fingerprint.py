"""Fingerprints for checkpoint identities: of Python functions by value (custom metrics), and of
a model's weights and config (`model_fingerprint`; also how a Ray worker proves it loaded the
driver's model).

What a function computes depends on its code and on every value the code reads from outside:
default arguments, closure cells, the module globals it names (also from nested functions), and,
recursively, the same for the functions it calls. All of these are described by value (code by
bytecode and constants, tensors by dtype, shape and bytes, plain data by repr) and hashed. Modules,
classes and the functions of installed libraries count by name (the installed version pins their
code). Anything else has no stable value and is refused with a SpliceError naming it.
"""

from __future__ import annotations

import builtins
import dis
import functools
import hashlib
import json
import sys
import sysconfig
import types
from collections.abc import Callable
from typing import Any

import torch

from ..engine import devices
from ..errors import SpliceError

_PLAIN = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis))
_LIBRARIES = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})
_GLOBAL_LOADS = {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"}


def fingerprint(fn: Callable[..., Any]) -> str:
    """A digest of what a function computes, by value, for a checkpoint's identity.

    Two functions with the same code reading the same values get the same fingerprint, in any
    process; changing the code, a default, a closure cell or a global it reads changes it. So a
    sweep resumed with a custom metric that reads other values is refused instead of mixed.

    Args:
        fn: A function, method, `functools.partial` or builtin (see the module docstring for
            what is described and how).

    Returns:
        A sha256 hex digest (64 characters).

    Raises:
        SpliceError: Naming the first value with no stable description (e.g. an arbitrary
            object a global or closure refers to).

    Example:
        >>> a = fingerprint(lambda logits, baseline, batch: logits[:, -1, 3])
        >>> a == fingerprint(lambda logits, baseline, batch: logits[:, -1, 3])
        True
        >>> a == fingerprint(lambda logits, baseline, batch: logits[:, -1, 4])
        False
        >>> thing = object()
        >>> fingerprint(lambda logits, baseline, batch: thing)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: global 'thing' read by <lambda> is an object of type object, which has no stable value ...
    """
    return hashlib.sha256(_Describe().value(fn, "the metric function").encode()).hexdigest()


class _Describe:
    """Stable text descriptions; `active` holds the objects being described, so cycles (a
    recursive function, a list holding itself) end."""

    def __init__(self):
        self.active: set[int] = set()

    def value(self, value, where: str) -> str:
        if isinstance(value, _PLAIN):
            return f"{type(value).__name__}:{value!r}"
        if isinstance(value, (torch.dtype, torch.device)):
            return f"torch:{value}"
        if isinstance(value, torch.Tensor):
            return _tensor(value, where)
        if _is_numpy(value):
            return _array(value, where)
        if isinstance(value, types.ModuleType):
            return f"module:{value.__name__}"
        if isinstance(value, type):
            return f"class:{value.__module__}.{value.__qualname__}"
        if id(value) in self.active:
            return "cycle"
        self.active.add(id(value))
        try:
            return self._compound(value, where)
        finally:
            self.active.discard(id(value))

    def _compound(self, value, where: str) -> str:
        kind = type(value).__name__
        if isinstance(value, (list, tuple)):
            return f"{kind}[{','.join(self.value(v, f'{where}[{i}]') for i, v in enumerate(value))}]"
        if isinstance(value, (set, frozenset)):
            return f"{kind}{{{','.join(sorted(self.value(v, where) for v in value))}}}"
        if isinstance(value, dict):
            items = sorted(
                f"{self.value(k, where)}:{self.value(v, f'{where}[{k!r}]')}" for k, v in value.items()
            )
            return f"{kind}{{{','.join(items)}}}"
        if isinstance(value, slice):
            return f"slice({self.value((value.start, value.stop, value.step), where)})"
        if isinstance(value, types.FunctionType):
            return self.function(value)
        if isinstance(value, functools.partial):
            return f"partial({self.value((value.func, value.args, value.keywords), where)})"
        if isinstance(value, types.MethodType):
            return f"method({self.value(value.__func__, where)},{self.value(value.__self__, f'the object {where} is bound to')})"
        if isinstance(value, types.BuiltinFunctionType):
            owner = value.__self__
            bound = (
                ""
                if owner is None or isinstance(owner, types.ModuleType)
                else self.value(owner, f"the object {where} is bound to")
            )
            return f"builtin:{getattr(value, '__module__', None)}.{value.__qualname__}:{bound}"
        raise SpliceError(f"{where} is an object of type {kind}, which has no stable value to fingerprint")

    def function(self, fn: types.FunctionType) -> str:
        """Code, defaults, closure cells and the globals the code names (library functions: name)."""
        name = fn.__qualname__
        if fn.__code__.co_filename.startswith(_LIBRARIES):
            return f"function:{fn.__module__}.{name}"
        code = fn.__code__
        cells = [
            self._cell(c, f"closure variable {v!r} of {name}")
            for v, c in zip(code.co_freevars, fn.__closure__ or ())
        ]
        names = sorted(_global_names(code))
        found = [f"{n}={self._global(fn, n)}" for n in names]
        defaults = self.value(
            (fn.__defaults__ or (), fn.__kwdefaults__ or {}), f"a default argument of {name}"
        )
        return f"fn({self.code(code)};{defaults};{','.join(cells)};{','.join(found)})"

    def code(self, code: types.CodeType) -> str:
        consts = ",".join(
            self.code(c) if isinstance(c, types.CodeType) else self.value(c, "a constant")
            for c in code.co_consts
        )
        shape = (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)
        table = getattr(code, "co_exceptiontable", b"").hex()
        return f"code({code.co_code.hex()};{consts};{code.co_names};{code.co_varnames};{code.co_freevars};{code.co_cellvars};{shape};{table})"

    def _cell(self, cell, where: str) -> str:
        try:
            contents = cell.cell_contents
        except ValueError:  # not yet assigned
            return "empty"
        return self.value(contents, where)

    def _global(self, fn, name: str) -> str:
        if name in fn.__globals__:
            return self.value(fn.__globals__[name], f"global {name!r} read by {fn.__qualname__}")
        return "builtin" if hasattr(builtins, name) else "unbound"


def _global_names(code: types.CodeType) -> set[str]:
    """Names the code (and code nested in it) loads from its module's globals."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in _GLOBAL_LOADS}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _tensor(value: torch.Tensor, where: str) -> str:
    if value.layout != torch.strided or value.is_quantized or value.device.type == "meta":
        raise SpliceError(
            f"{where} is a {value.layout} {value.device.type} tensor; only dense tensors with data are fingerprinted"
        )
    data = value.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()
    return f"tensor:{value.dtype}:{list(value.shape)}:{digest}"


def _is_numpy(value) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic))


def _array(value, where: str) -> str:
    if value.dtype.hasobject:
        raise SpliceError(
            f"{where} is a numpy array of Python objects, which has no stable value to fingerprint"
        )
    return f"numpy:{value.dtype.str}:{list(value.shape)}:{hashlib.sha256(value.tobytes()).hexdigest()}"


def model_fingerprint(model) -> str:
    """Identity of a model's weights and config, for checkpoint spec hashes."""
    digest = hashlib.sha256(type(model.hf).__name__.encode())
    digest.update(model.hf.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():  # offloaded weights (accelerate) are read from where they rest
        sums = [float(p.double().sum()) for p in devices.parameters(model.hf)]
    digest.update(json.dumps(sums).encode())
    return digest.hexdigest()
