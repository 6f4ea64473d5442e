"""One module per architecture family: a tiny random config and the hand-written module map
(module paths, head reshapes) that the tests compare splice against, independent of splice's own
tables. Each module defines: tiny() (vocab >= 97), hand_module(hf, point, layer),
hand_heads(hf, point), norms(hf, layer) -> (attention's input norm, MLP's input norm),
mlp(hf, layer), layers(hf). Optional: PARALLEL_RESIDUAL = True (attention and MLP both read
resid_pre; no resid_mid), after_attn_proj(hf, layer, x) / after_mlp_proj(hf, layer, x) for
families that normalise a sublayer's output before adding it (Gemma2), defaulting to identity."""

import importlib
import pkgutil

FAMILIES = {
    info.name: importlib.import_module(f"{__name__}.{info.name}")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)
}


def spec(family):
    return FAMILIES[family]


def parallel(family) -> bool:
    return getattr(FAMILIES[family], "PARALLEL_RESIDUAL", False)


def after_attn_proj(family, hf, layer, x):
    fn = getattr(FAMILIES[family], "after_attn_proj", None)
    return fn(hf, layer, x) if fn else x


def after_mlp_proj(family, hf, layer, x):
    fn = getattr(FAMILIES[family], "after_mlp_proj", None)
    return fn(hf, layer, x) if fn else x
