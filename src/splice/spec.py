"""Model specs: what another process needs to load the same model.

A sweep run on Ray loads the model once in every worker, so the model must be describable as data:
a name (the embedded SmolLM2, a local folder or a hub name) plus the loading options that change
what it computes or where it lives. `splice.load(spec)` takes the same forms the sweep config's
`model:` key and the CLI take, and the `Model` it returns keeps its spec (`m.spec`). A model wrapped
by hand has no spec; a zero-argument factory function (`ModelSpec.from_factory`) stands in for one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import SpliceError

if TYPE_CHECKING:
    from .engine.model import Model

KEYS = ("model", "dtype", "device_map", "attn_implementation", "revision", "offload_folder", "options")
"""The keys a spec mapping may have (`model` is the name; the rest are loading options; `options`
holds any other `from_pretrained` keyword arguments, as plain data)."""
DTYPES = ("float32", "bfloat16", "float16", "auto")
"""The dtype names a spec accepts (`auto`: the checkpoint's own)."""
FORM = (
    "a model spec: a name (None or 'embedded' for the embedded SmolLM2, a local folder, a hub name) "
    f"or a mapping with keys {', '.join(KEYS)}"
)


@dataclass(frozen=True)
class ModelSpec:
    """A model as data: `load()` builds it, `to_dict()` writes it (YAML/JSON), `parse` reads it.

    Args:
        model: None / "embedded" for the embedded SmolLM2-135M, a local folder or a hub name.
        dtype: "float32", "bfloat16", "float16" or "auto"; None keeps transformers' default.
        device_map: passed to `from_pretrained` (e.g. "auto", "cpu" or {module: device}); needs
            accelerate.
        attn_implementation: e.g. "eager" or "sdpa".
        revision: a hub revision (branch, tag or commit).
        offload_folder: where accelerate puts layers mapped to "disk".
        options: other `from_pretrained` keyword arguments (plain values: they are written to
            config files and checkpoints).
        factory: instead of all the above, a zero-argument function returning a `splice.Model`
            (or a Hugging Face model); it must be picklable by cloudpickle to go to Ray workers.

    Example:
        >>> spec = ModelSpec.parse({"model": "embedded", "dtype": "bfloat16"})
        >>> spec.to_dict()
        {'model': 'embedded', 'dtype': 'bfloat16'}
        >>> ModelSpec.parse("gpt2") == ModelSpec(model="gpt2")
        True
        >>> ModelSpec.parse({"model": "gpt2", "precision": "bf16"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: model spec: unknown key 'precision'; expected model, dtype, ...
    """

    model: str | None = None
    dtype: str | None = None
    device_map: str | dict[str, Any] | None = None
    attn_implementation: str | None = None
    revision: str | None = None
    offload_folder: str | None = None
    options: dict[str, Any] | None = None
    factory: Callable[[], Any] | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SpliceError(f"model spec: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.factory is not None and not callable(self.factory):
            raise SpliceError(f"model spec: factory must be a zero-argument function; got {self.factory!r}")

    @classmethod
    def parse(cls, value: Any) -> ModelSpec:
        """A spec from a name, a path, None (the embedded model), a mapping or a spec.

        Raises:
            SpliceError: For an unknown key, a dtype outside `DTYPES`, or another type.
        """
        if isinstance(value, ModelSpec):
            return value
        if value is None or isinstance(value, (str, os.PathLike)):
            return cls(model=None if value is None else os.fspath(value))
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(KEYS), key=str)
            if unknown:
                raise SpliceError(f"model spec: unknown key {unknown[0]!r}; expected {', '.join(KEYS)}")
            model = value.get("model")
            if model is not None and not isinstance(model, (str, os.PathLike)):
                raise SpliceError(f"model spec: model is a name or a path; got {model!r}")
            dtype = value.get("dtype")
            if dtype is not None and not isinstance(dtype, str):  # a torch.dtype
                dtype = str(dtype).removeprefix("torch.")
            rest = {k: value[k] for k in KEYS[2:] if value.get(k) is not None}
            if not isinstance(rest.get("options", {}), Mapping):
                raise SpliceError(
                    f"model spec: options is a mapping of from_pretrained arguments; got {rest['options']!r}"
                )
            return cls(model=None if model is None else os.fspath(model), dtype=dtype, **rest)
        from .engine.model import Model

        if isinstance(value, Model):
            return spec_of(value)
        if callable(value) and not hasattr(value, "forward"):  # a function, not a module
            return cls.from_factory(value)
        raise SpliceError(f"expected {FORM}; got {type(value).__name__}")

    @classmethod
    def from_factory(cls, factory: Callable[[], Any]) -> ModelSpec:
        """A spec that is a function: `factory()` returns the model in every process that loads it.

        Example:
            >>> ModelSpec.from_factory(lambda: None).describe()
            'factory <lambda>'
        """
        return cls(factory=factory)

    @property
    def is_embedded(self) -> bool:
        """Whether this names the embedded SmolLM2 (None, "embedded", "smollm2", ...)."""
        from .loading import EMBEDDED_NAMES

        return self.factory is None and self.model in EMBEDDED_NAMES

    def to_dict(self) -> dict[str, Any]:
        """The spec as a plain mapping (for config files, checkpoints and indexes); unset options
        are left out. A factory spec is `{"factory": "<qualified name>"}` (informational: a
        function cannot be written as data)."""
        if self.factory is not None:
            return {"factory": self.describe()}
        out: dict[str, Any] = {"model": "embedded" if self.is_embedded else self.model}
        for key in KEYS[1:]:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def describe(self) -> str:
        """One line for messages: the name and options, or the factory's name."""
        if self.factory is not None:
            return f"factory {getattr(self.factory, '__qualname__', repr(self.factory))}"
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items())

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """The keyword arguments this spec passes to `AutoModelForCausalLM.from_pretrained`."""
        out: dict[str, Any] = {}
        if self.dtype is not None:
            import torch

            out["dtype"] = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
        for key in KEYS[2:-1]:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.options or {})
        return out

    def load(self, progress: bool = False) -> Model:
        """Build the model this spec names (in this process), remembering the spec.

        Raises:
            SpliceError: As `splice.load`, or if a factory returns something that is not a model.
        """
        from .engine.model import Model

        if self.factory is None:
            return load_model(self, progress)
        built = self.factory()
        if isinstance(built, Model):
            built.spec = self
            return built
        import torch.nn as nn

        if isinstance(built, nn.Module):
            return Model(built, spec=self)
        raise SpliceError(
            f"model spec: {self.describe()} returned {type(built).__name__}; expected a splice.Model "
            "or a Hugging Face model"
        )


def spec_of(model: Any) -> ModelSpec:
    """The spec another process would load `model` from: `model` itself when it is a spec, a
    name, a mapping or a factory; a `splice.Model`'s `spec`.

    Raises:
        SpliceError: For a model wrapped by hand (`splice.Model(hf)`), saying how to give it one.

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)
        >>> spec_of(splice.Model(transformers.GPT2LMHeadModel(config)))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: this model was wrapped by hand (splice.Model(hf)), so other processes ...
    """
    from .engine.model import Model

    if isinstance(model, Model):
        if model.spec is None:
            raise SpliceError(
                "this model was wrapped by hand (splice.Model(hf)), so other processes cannot load it: "
                "load it with splice.load(spec) (a name or a mapping with model, dtype, device_map, ...), "
                "or pass splice.Model(hf, tokenizer, spec=ModelSpec.from_factory(make_model)) where "
                "make_model() builds it, or pass the factory itself in place of the model"
            )
        return ModelSpec.parse(model.spec)
    return ModelSpec.parse(model)


def load(spec: Any = None, progress: bool = False, **kwargs: Any) -> Model:
    """A `splice.Model` for a model spec: a hub name, a local folder, None (the embedded
    SmolLM2-135M), or a mapping with `model`, `dtype`, `device_map`, `attn_implementation`,
    `revision`, `offload_folder` (see `splice.spec.ModelSpec`). The model remembers it (`m.spec`),
    so that Ray workers can load the same model.

    Args:
        spec: The model spec; None (the default) is the embedded SmolLM2-135M-Instruct.
        progress: Show transformers' per-load progress bars (off by default).
        **kwargs: Loading options, merged into the spec: its keys (`dtype="bfloat16"`,
            `device_map="auto"`, ...; a `torch.dtype` is accepted), anything else is passed to
            `AutoModelForCausalLM.from_pretrained` as `options`.

    Returns:
        The model, wrapped, in eval mode, with its tokenizer and spec.

    Raises:
        SpliceError: As `load_hf`; for a malformed spec; or for a model splice has no table for.

    Example:
        >>> import splice
        >>> splice.load("/no/such/model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: cannot load the model '/no/such/model': ...
        >>> splice.load({"model": "embedded", "dtype": "fp16"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: model spec: dtype 'fp16' is not one of float32, bfloat16, float16, auto
    """
    parsed = ModelSpec.parse(spec)
    if kwargs:
        if parsed.factory is not None:
            raise SpliceError(f"loading options {sorted(kwargs)} cannot be applied to a factory spec")
        if "torch_dtype" in kwargs:  # transformers' older name
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        merged = {k: v for k, v in parsed.to_dict().items() if k != "options"}
        options = dict(parsed.options or {})
        for key, value in kwargs.items():
            if key in KEYS and key != "options":
                merged[key] = value
            else:
                options[key] = value
        parsed = ModelSpec.parse({**merged, "options": options or None})
    return parsed.load(progress)


def load_model(spec: Any, progress: bool = False) -> Model:
    """`spec.load()` for a named spec: `load_hf` with the spec's options, wrapped with the spec."""
    from .engine.model import Model
    from .loading import load_hf, quiet_loading

    name = None if spec.is_embedded else spec.model
    options = spec.from_pretrained_kwargs()
    if progress:
        model, tokenizer = load_hf(name, **options)
    else:
        with quiet_loading():
            model, tokenizer = load_hf(name, **options)
    return Model(model, tokenizer, spec=spec)
