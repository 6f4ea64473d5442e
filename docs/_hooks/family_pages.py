"""mkdocs hook: one page per architecture family, generated from splice's own tables at build time.

Nothing here restates a table. For every `Architecture` in `splice.ARCHITECTURES` the page is
built from:

- the family module's docstring (the table's own description),
- `Architecture.points(dims)`, called with sizes that remember their names, so a view prints as a
  formula (`Heads(n_kv_heads, start=n_heads·d_head, ...)`) rather than as numbers of one model,
- a `splice.Layout` bound to the family's default Hugging Face config, instantiated on the `meta`
  device (no memory, no weights) with one layer: it says which points are sites for that config
  (a parallel residual has no `resid_mid`; attention computed inline has no pattern sites).

The pages are added to the build as generated files and to the nav section titled
"Architectures"; `architectures/index.md` gets a summary table in place of the marker
`<!-- splice:families -->`. Adding a family to `src/splice/architectures/` adds its page.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
from functools import cache

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.splice")

SECTION = "Architectures"
FOLDER = "architectures"
MARKER = "<!-- splice:families -->"


# -- sizes that print as their names -----------------------------------------------------------
class Size:
    """An int-like size that remembers how it was computed from the named sizes of `Dims`.

    Comparisons and indexing use the value (so a table may branch on `n_kv_heads == 1` or call
    `range(n_heads)`); arithmetic builds a new Size whose text is the formula."""

    def __init__(self, text: str, value: int, precedence: int = 3):
        self.text, self.value, self.precedence = text, value, precedence

    @staticmethod
    def of(x) -> Size:
        return x if isinstance(x, Size) else Size(str(x), int(x))

    def _wrap(self, at_least: int) -> str:
        return self.text if self.precedence >= at_least else f"({self.text})"

    def _binary(self, other, symbol: str, value: int, precedence: int, swap: bool = False) -> Size:
        a, b = (Size.of(other), self) if swap else (self, Size.of(other))
        right = precedence + 1 if symbol in (" - ", " // ") else precedence  # not associative
        text = f"{a._wrap(precedence)}{symbol}{b._wrap(right)}"
        return Size(text, value, precedence)

    def __add__(self, o):
        return self._binary(o, " + ", self.value + int(o), 1)

    def __radd__(self, o):
        return self._binary(o, " + ", int(o) + self.value, 1, swap=True)

    def __sub__(self, o):
        return self._binary(o, " - ", self.value - int(o), 1)

    def __rsub__(self, o):
        return self._binary(o, " - ", int(o) - self.value, 1, swap=True)

    def __mul__(self, o):
        return self._binary(o, "·", self.value * int(o), 2)

    def __rmul__(self, o):
        return self._binary(o, "·", int(o) * self.value, 2, swap=True)

    def __floordiv__(self, o):
        return self._binary(o, " // ", self.value // int(o), 2)

    def __int__(self):
        return self.value

    __index__ = __int__

    def __eq__(self, o):
        return self.value == int(o) if isinstance(o, (int, Size)) else NotImplemented

    def __lt__(self, o):
        return self.value < int(o)

    def __le__(self, o):
        return self.value <= int(o)

    def __gt__(self, o):
        return self.value > int(o)

    def __ge__(self, o):
        return self.value >= int(o)

    def __hash__(self):
        return hash(self.value)

    def __repr__(self):
        return self.text


def symbolic(dims):
    """The same Dims with every size named after its field."""
    return type(dims)(**{f.name: Size(f.name, getattr(dims, f.name)) for f in dataclasses.fields(dims)})


def show_view(view) -> str:
    """`Heads(n_heads, start=0, stop=n_heads·d_head)`: the view's fields, unset ones left out."""
    if not dataclasses.is_dataclass(view):
        return type(view).__name__
    values = [(f.name, getattr(view, f.name)) for f in dataclasses.fields(view)]
    values = [(n, v) for n, v in values if v is not None]
    shown = [(n, show_view(v) if dataclasses.is_dataclass(v) else repr(v)) for n, v in values]  # nested views
    parts = [v if i == 0 else f"{n}={v}" for i, (n, v) in enumerate(shown)]
    return f"{type(view).__name__}({', '.join(parts)})"


# -- one family ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Family:
    arch: object
    module: object
    model_type: str
    hf_class: str
    config_class: str
    sizes: object  # Dims of the default config
    symbolic_points: dict
    sites: set  # points that are sites of a model built from the default config
    parallel_residual: bool
    logits_transform: bool

    @property
    def name(self) -> str:
        return self.arch.name

    @property
    def title(self) -> str:
        """The family's name as its module docstring writes it ("GPT-NeoX / Pythia", "Llama family")."""
        first = (self.module.__doc__ or self.name).strip().splitlines()[0]
        return first.split(" (`")[0].split(":")[0].strip() or self.name

    @property
    def description(self) -> str:
        return (self.module.__doc__ or "").strip()

    @property
    def uri(self) -> str:
        return f"{FOLDER}/{self.name}.md"


def _module_of(arch):
    import splice.architectures as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if getattr(module, "ARCHITECTURE", None) is arch:
            return module
    raise LookupError(f"no module of splice.architectures defines {arch.name}")


def _family(arch) -> Family:
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from splice import Layout

    model_type = arch.model_types[0]
    config = transformers.AutoConfig.for_model(model_type)
    sizes = arch.dims(config)
    small = transformers.AutoConfig.for_model(model_type)
    small.num_hidden_layers = 1
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(small)
    return Family(
        arch=arch,
        module=_module_of(arch),
        model_type=model_type,
        hf_class=MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "?"),
        config_class=type(config).__name__,
        sizes=sizes,
        symbolic_points=arch.points(symbolic(sizes)),
        sites=set(Layout(model).points),
        parallel_residual=bool(arch.parallel_residual(config)),
        logits_transform=arch.logits_transform(config) is not None,
    )


@cache
def families() -> tuple[Family, ...]:
    import splice

    return tuple(_family(arch) for arch in splice.ARCHITECTURES)


# -- rendering -------------------------------------------------------------------------------------
def _site_order():
    from splice.engine.sites import GLOBAL_POINTS, LAYER_POINTS

    return ["embed", *LAYER_POINTS, *(p for p in GLOBAL_POINTS if p != "embed")]


def _site_name(point: str) -> str:
    from splice.engine.sites import GLOBAL_POINTS

    return point if point in GLOBAL_POINTS else f"blocks.{{l}}.{point}"


def _reads(point) -> str:
    if point.io == "attention":
        return "inside the attention function"
    where = point.io
    if point.io == "input" and point.arg != "hidden_states":
        where += f" `{point.arg}=`"
    if point.field not in (0, None):
        where += f" `.{point.field}`" if isinstance(point.field, str) else f" `[{point.field}]`"
    return where


def _axes(point_name: str) -> str:
    from splice.engine.sites import POINT_AXES

    return "[" + ", ".join(POINT_AXES.get(point_name, ())) + "]"


def _why_absent(family: Family, point: str) -> str:
    if point == "resid_mid" and family.parallel_residual:
        return "not a site with the default config: parallel residual"
    if point in ("attn.scores", "attn.pattern"):
        return "not a site: attention is computed inline, not through `AttentionInterface`"
    return "not a site with the default config"


def family_page(family: Family) -> str:
    s = family.sizes
    ordered = [p for p in _site_order() if p in family.symbolic_points]
    ordered += sorted(set(family.symbolic_points) - set(ordered))
    absent = [p for p in ordered if p not in family.sites]
    lines = [
        f"# {family.title}",
        "",
        "*Generated from `splice.architectures."
        f"{family.module.__name__.rsplit('.', 1)[-1]}` when the site is built.*",
        "",
        "| | |",
        "|---|---|",
        f"| splice family | `{family.name}` |",
        f"| `model_type` | {', '.join(f'`{t}`' for t in family.arch.model_types)} |",
        f"| Hugging Face class | `{family.hf_class}` |",
        f"| decoder attribute | `{family.arch.decoder}` |",
        f"| parallel residual (default `{family.config_class}`) | {'yes' if family.parallel_residual else 'no'} |",
        f"| attention pattern sites | {'yes' if 'attn.pattern' in family.sites else 'no'} |",
        f"| logits transform outside `lm_head` | {'yes' if family.logits_transform else 'no'} |",
        "",
        "## What the table says",
        "",
        family.description,
        "",
        "## Sites",
        "",
        "`{l}` is the layer. *module* is the path of the Hugging Face module whose tensor holds the",
        "site (empty: the model's own output); *reads* says whether the site is that module's input,",
        "its output, or is read inside the attention function; *view* is how the site is cut out of",
        "the module's tensor (see [views](index.md#views)), written in the sizes below.",
        "",
        "| site | module | reads | view | axes |",
        "|---|---|---|---|---|",
    ]
    for point in ordered:
        p = family.symbolic_points[point]
        name = f"`{_site_name(point)}`"
        if point in absent:
            name += f" ({_why_absent(family, point)})"
        module = f"`{p.module}`" if p.module else "(the model)"
        lines.append(f"| {name} | {module} | {_reads(p)} | `{show_view(p.view)}` | `{_axes(point)}` |")
    lines += [
        "",
        f"This page was built from the default `{family.config_class}`: n_layers {s.n_layers}, "
        f"d_model {s.d_model}, n_heads {s.n_heads}, n_kv_heads {s.n_kv_heads}, d_head {s.d_head}, "
        f"d_mlp {s.d_mlp}, vocab {s.vocab}. The views are written in the names of these sizes, so they",
        "hold for any config; where a table picks a layout by size or by a config flag (described",
        "above), the layout shown is the default config's.",
        "",
    ]
    return "\n".join(lines)


def summary_table() -> str:
    lines = [
        "| family | `model_type` | Hugging Face class | parallel residual (default config) | pattern sites |",
        "|---|---|---|---|---|",
    ]
    for f in families():
        lines.append(
            f"| [{f.title}]({f.name}.md) | {', '.join(f'`{t}`' for t in f.arch.model_types)} | "
            f"`{f.hf_class}` | {'yes' if f.parallel_residual else 'no'} | "
            f"{'yes' if 'attn.pattern' in f.sites else 'no'} |"
        )
    return "\n".join(lines)


# -- mkdocs events -------------------------------------------------------------------------------
def _section(nav):
    for item in nav or []:
        if isinstance(item, dict) and SECTION in item and isinstance(item[SECTION], list):
            return item[SECTION]
    return None


def on_config(config):
    section = _section(config["nav"])
    if section is None:
        log.warning(f"mkdocs.yml has no nav section {SECTION!r}: the architecture pages are not in the nav")
        return config
    listed = {v for item in section for v in (item.values() if isinstance(item, dict) else [item])}
    for family in families():
        if family.uri not in listed:
            section.append({family.title: family.uri})
    return config


def on_files(files, config):
    for family in families():
        files.append(File.generated(config, family.uri, content=family_page(family)))
    return files


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        return markdown.replace(MARKER, summary_table())
    return markdown
