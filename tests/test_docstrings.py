"""The public surface is documented: every name in `splice.__all__`, every public method of the
classes it exports (and of the splice classes they inherit from), every public function, class and
method of the engine and infrastructure modules, and the selection rules where `help()` shows them.

A docstring counts only if someone wrote it: a dataclass without one gets an `__doc__` made from
its signature, which is not documentation."""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import pydoc
import types
from pathlib import Path

import pytest

import splice
from splice.engine.interventions import Intervention, registered_types

# Modules whose every public function, class and method must have a docstring (the engine and
# infrastructure layers; the features on top are covered through `splice.__all__`).
DOCUMENTED_MODULES = [
    "splice.errors",
    "splice.compat",
    "splice.loading",
    "splice.cli",
    "splice.strategies",
    "splice.architectures",
    "splice.architectures.table",
    "splice.architectures.views",
    "splice.architectures.bloom",
    "splice.architectures.falcon",
    "splice.architectures.gemma",
    "splice.architectures.gemma2",
    "splice.architectures.gpt2",
    "splice.architectures.gpt_neox",
    "splice.architectures.gptj",
    "splice.architectures.llama",
    "splice.architectures.mistral",
    "splice.architectures.opt",
    "splice.architectures.phi3",
    "splice.architectures.qwen2",
    "splice.engine.sites",
    "splice.engine.selection",
    "splice.engine.frame",
    "splice.engine.codec",
    "splice.engine.files",
    "splice.engine.interventions",
    "splice.engine.directional",
    "splice.engine.sources",
    "splice.engine.edits",
    "splice.engine.model",
    "splice.engine.recording",
    "splice.engine.tokens",
    "splice.engine.weights",
    "splice.engine.readout",
    "splice.engine.tl_hooks",
    "splice.engine.generation",
    "splice.sweeps.sweep",
    "splice.sweeps.shards",
    "splice.sweeps.ray_executor",
    "splice.spec",
    "splice.engine.devices",
    "splice.activations",
    "splice.activations.corpus",
    "splice.activations.index",
    "splice.activations.store",
    "splice.activations.writer",
    "splice.sae",
    "splice.sae.config",
    "splice.sae.modules",
    "splice.sae.files",
    "splice.engine.autoencoders",
    "splice.engine.spliced",
    "splice.sweeps.features",
    "splice.sae.sites",
    "splice.sweeps.metrics",
    "splice.sweeps.tables",
    "splice.patching",
    "splice.path_patching",
    "splice.steering",
    "splice.plot",
    "splice.lens",
    "splice.lens.sites",
    "splice.lens.checks",
    "splice.lens.tuned",
    "splice.lens.readout",
    "splice.lens.table",
    "splice.lens.texts",
    "splice.lens.evaluation",
    "splice.lens.training",
    "splice.geometry",
    "splice.analysis",
    "splice.engine.layout",
    "splice.engine.plan",
    "splice.engine.hooks",
    "splice.engine.attention",
    "splice.engine.prompt_report",
    "splice.sweeps.data",
    "splice.sweeps.replay",
    "splice.sweeps.suffix",
    "splice.sweeps.suffix_edits",
    "splice.circuits",
    "splice.circuits.graph",
    "splice.circuits.inputs",
    "splice.circuits.runs",
    "splice.circuits.scores",
    "splice.circuits.evaluate",
    "splice.circuits.circuit",
    "splice.sweeps.checkpoint",
    "splice.sweeps.fingerprint",
    "splice.config",
]

# What `help()` must show for every intervention: the selection arguments and their rules.
SELECTION_RULES = {
    "pos": "bool mask",  # pos: int, negative int, slice, list, or a [batch, pos] bool mask
    "heads": "head sites",  # heads: int or list, head sites only
    "dims": "last axis",  # dims: over the site's last axis
    "rows": "batch rows",  # rows: batch rows
}


def written_doc(obj: object) -> str | None:
    """The docstring someone wrote for `obj`, or None (also for a dataclass's generated one)."""
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, (property, functools.cached_property)):
        obj = obj.fget if isinstance(obj, property) else obj.func
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        generated = obj.__name__ + str(inspect.signature(obj)).replace(" -> None", "")
        if doc == generated:
            return None
    return doc


def public_members(cls: type) -> dict[str, object]:
    """The public methods, properties, classmethods and staticmethods a class defines itself
    (not dataclass fields, whose defaults may be functions)."""
    fields = getattr(cls, "__dataclass_fields__", {})
    members = {}
    for name, value in vars(cls).items():
        if name.startswith("_") or name in fields:
            continue
        if isinstance(
            value, (types.FunctionType, property, functools.cached_property, staticmethod, classmethod)
        ):
            members[name] = value
    return members


def flat(text: str) -> str:
    """Lower-case text with every run of whitespace (line breaks, help's margins) as one space."""
    return " ".join(text.replace("|", " ").split()).lower()


def splice_classes_of(cls: type) -> list[type]:
    """`cls` and the classes it inherits from that splice defines (public or not)."""
    return [c for c in cls.__mro__ if c.__module__.split(".")[0] == "splice"]


def attribute_doc(module: types.ModuleType, name: str) -> str | None:
    """The string literal right after `name = ...` at the top level of a module (how an attribute
    is documented for mkdocstrings/griffe), or None."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    body = tree.body
    for statement, following in zip(body, body[1:]):
        targets = (
            statement.targets
            if isinstance(statement, ast.Assign)
            else [statement.target]
            if isinstance(statement, ast.AnnAssign)
            else []
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                return following.value.value
    return None


def defining_module(name: str) -> types.ModuleType:
    """The module whose source assigns a data attribute exported by `splice`."""
    for candidate in ("splice.architectures",):
        module = importlib.import_module(candidate)
        if hasattr(module, name):
            return module
    raise AssertionError(f"no known module defines splice.{name}")


# -- splice.__all__ --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", splice.__all__)
def test_every_exported_name_has_a_docstring(name):
    obj = getattr(splice, name)
    if isinstance(obj, (types.ModuleType, type, types.FunctionType)):
        assert written_doc(obj), f"splice.{name} has no docstring"
    else:  # data (e.g. ARCHITECTURES): an attribute docstring in the module that defines it
        assert attribute_doc(defining_module(name), name), f"splice.{name} has no attribute docstring"


EXPORTED_CLASSES = [name for name in splice.__all__ if isinstance(getattr(splice, name), type)]


@pytest.mark.parametrize("name", EXPORTED_CLASSES)
def test_every_public_method_of_an_exported_class_has_a_docstring(name):
    missing = [
        f"{owner.__qualname__}.{member}"
        for owner in splice_classes_of(getattr(splice, name))
        for member, value in public_members(owner).items()
        if not written_doc(value)
    ]
    assert not missing, f"undocumented public methods of splice.{name}: {missing}"


EXPORTED_MODULES = [name for name in splice.__all__ if isinstance(getattr(splice, name), types.ModuleType)]


@pytest.mark.parametrize("name", EXPORTED_MODULES)
def test_every_public_function_of_an_exported_module_has_a_docstring(name):
    module = getattr(splice, name)
    missing = [
        member
        for member, value in vars(module).items()
        if not member.startswith("_")
        and isinstance(value, (types.FunctionType, type))
        and value.__module__ == module.__name__
        and not written_doc(value)
    ]
    assert not missing, f"undocumented in splice.{name}: {missing}"


# -- the engine and infrastructure modules -----------------------------------------------------------
@pytest.mark.parametrize("module_name", DOCUMENTED_MODULES)
def test_every_public_function_class_and_method_has_a_docstring(module_name):
    module = importlib.import_module(module_name)
    assert written_doc(module), f"{module_name} has no module docstring"
    missing = []
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module_name:
            continue
        if isinstance(value, types.FunctionType) and not written_doc(value):
            missing.append(name)
        if isinstance(value, type):
            if not written_doc(value):
                missing.append(name)
            missing += [
                f"{name}.{member}" for member, v in public_members(value).items() if not written_doc(v)
            ]
    assert not missing, f"undocumented in {module_name}: {missing}"


# -- what help() shows for interventions ----------------------------------------------------------
INTERVENTIONS = [Intervention, *sorted(registered_types().values(), key=lambda cls: cls.__name__)]


@pytest.mark.parametrize("cls", INTERVENTIONS, ids=lambda cls: cls.__name__)
def test_every_intervention_documents_its_selection_in_its_own_docstring(cls):
    doc = written_doc(cls)
    assert doc, f"{cls.__name__} has no docstring"
    for argument in SELECTION_RULES:
        assert f"{argument}:" in doc, f"{cls.__name__}'s docstring does not describe {argument}="
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in SELECTION_RULES]
    for name in fields:
        assert f"{name}:" in doc, f"{cls.__name__}'s docstring does not describe its field {name}"


@pytest.mark.parametrize("cls", INTERVENTIONS, ids=lambda cls: cls.__name__)
def test_help_shows_the_selection_rules(cls):
    text = flat(pydoc.render_doc(cls, renderer=pydoc.plaintext))
    # Beyond the names (which the signature shows anyway): what each one accepts.
    for argument, rule in SELECTION_RULES.items():
        assert argument in text
        assert rule in text, f"help({cls.__name__}) does not say {argument}= takes/means {rule!r}"


def test_help_of_zero_shows_pos_heads_dims_and_rows():
    text = pydoc.render_doc(splice.Zero, renderer=pydoc.plaintext)
    # The class's own part of the page, without the signature line (which names the fields too).
    described = text.split("Method resolution order")[0]
    described = "\n".join(line for line in described.splitlines() if "Zero(*" not in line)
    for argument in ("pos", "heads", "dims", "rows"):
        assert f"{argument}: " in described, f"help(splice.Zero) does not document {argument}="


def test_the_base_class_states_every_selection_rule():
    doc = flat(written_doc(Intervention) or "")
    for phrase in (
        "negative int",
        "slice",
        "[batch, pos]",
        "bool mask",
        "head sites",
        "last axis",
        "batch rows",
        "broadcast",
        "as wide as the site",
        "cut to the selection",
        "gradients flow",
    ):
        assert phrase in doc, f"Intervention's docstring does not state {phrase!r}"


def test_the_docstring_checks_tell_written_from_generated_docs():
    @dataclasses.dataclass
    class Undocumented:
        x: int = 0

    @dataclasses.dataclass
    class Documented:
        """Written."""

        x: int = 0

    class Methods:
        def documented(self):
            """Written."""

        def bare(self):
            pass

        @property
        def value(self):
            return 1

        def _private(self):
            pass

    assert written_doc(Undocumented) is None
    assert written_doc(Documented) == "Written."
    assert sorted(public_members(Methods)) == ["bare", "documented", "value"]
    assert [name for name, v in public_members(Methods).items() if not written_doc(v)] == ["bare", "value"]
