"""`Layout`: one family's architecture table bound to one model instance: where each site
lives in *this* model, its shape, and which hooks see it."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..architectures import architecture_for, uses_attention_interface
from ..architectures.table import Dims, Point
from ..errors import SpliceError
from .sites import Site, all_names, expand, site_axes


class Layout:
    """Where every site of one model instance lives, and its shape.

    The family's architecture table (see `splice.architectures`) bound to one model: the
    module and view of each site, the sizes of its axes, and which hooks see it. Built once per
    model by the hook engine (`splice.Model(...).layout`); models that no longer exist are not
    kept alive by it. Sites of the decoder alone are accepted too (e.g. a bare `LlamaModel`:
    then there is no `logits` site).

    Args:
        model: A supported Hugging Face `*ForCausalLM` (or its bare decoder), chosen by
            `config.model_type`.

    Raises:
        SpliceError: For an unsupported model (naming its class and `model_type`) or a
            configuration the family's table refuses.

    Example:
        >>> import transformers, splice
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32,
        ...                                  vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> layout = splice.Layout(transformers.GPT2LMHeadModel(config))  # tiny, random weights
        >>> layout.arch.name, layout.n_layers
        ('gpt2', 2)
        >>> [site.name for site in layout.sites_of("blocks.*.attn.z")]
        ['blocks.0.attn.z', 'blocks.1.attn.z']
        >>> site = layout.sites_of(("z", 1))[0]
        >>> layout.module_path(site), layout.axes(site), layout.shape(site)
        ('transformer.h.1.attn.c_proj', ('batch', 'pos', 'head', 'd_head'), (None, None, 2, 8))
        >>> layout.site_names()[:4]
        ['embed', 'blocks.0.resid_pre', 'blocks.0.attn.in', 'blocks.0.attn.q']
        >>> layout.sites_of("blocks.2.resid_post")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: layer 2 in site 'blocks.2.resid_post' is out of range: ...
    """

    def __init__(self, model: nn.Module):
        self.arch = architecture_for(model)
        self.logits_transform: Callable[[torch.Tensor], torch.Tensor] | None = self.arch.logits_transform(
            model.config
        )
        self._model = weakref.ref(model)  # weak: the per-model engine registry must not keep models alive
        self.dims: Dims = self.arch.dims(model.config)
        self.parallel_residual = self.arch.parallel_residual(model.config)
        # Accept the bare decoder (e.g. LlamaModel) as well as the *ForCausalLM around it.
        strip = "" if hasattr(model, self.arch.decoder) else self.arch.decoder + "."
        self.points: dict[str, Point] = {}
        for name, point in self.arch.points(self.dims).items():
            path = point.module
            if strip:
                if not path.startswith(strip):
                    continue  # e.g. lm_head: not part of a bare decoder
                path = path[len(strip) :]
            if name == "resid_mid" and self.parallel_residual:
                continue
            if point.io == "attention" and not uses_attention_interface(
                model.get_submodule(path.replace("{l}", "0"))
            ):
                continue
            self.points[name] = dataclasses.replace(point, module=path)
        self._resolved: dict[object, tuple[Site, ...]] = {}  # key -> sites; a key's meaning never changes
        self._shapes: dict[tuple[str, str | None], tuple] = {}
        self._hooks_of: dict[Site, tuple] = {}
        self._by_hook: dict[tuple[str, str], list[tuple[Site, Point]]] | None = None

    @property
    def model(self) -> nn.Module:
        """The model this layout describes.

        Raises:
            SpliceError: If it no longer exists (the layout holds it weakly).
        """
        model = self._model()
        if model is None:
            raise SpliceError("the model this layout describes no longer exists (it was garbage-collected)")
        return model

    @property
    def n_layers(self) -> int:
        """The number of decoder layers."""
        return self.dims.n_layers

    def sites_of(self, key: Any) -> list[Site]:
        """The sites a key names on this model, validated.

        Valid keys are remembered: entering a context per call re-resolves the same few keys.

        Args:
            key: A site key (`splice.engine.sites.SiteKey`): a name, an alias, a
                `(name, layer)` tuple or a glob.

        Returns:
            The sites, in forward order for a glob.

        Raises:
            SpliceError: For a name this model does not have (with the closest ones), a glob
                matching nothing, or `resid_mid` on a parallel-residual model.
        """
        try:
            return list(self._resolved[key])
        except (KeyError, TypeError):  # TypeError: an unhashable key, refused by _resolve below
            sites = self._resolve(key)
        if isinstance(key, (str, tuple)):
            self._resolved[key] = tuple(sites)
        return sites

    def _resolve(self, key) -> list[Site]:
        if self.parallel_residual and "resid_mid" in str(key):
            raise SpliceError(
                f"{key!r}: this {self.arch.name} model uses a parallel residual (attention and MLP both read "
                "resid_pre and add to it at once), so there is no residual stream between them; "
                "use attn.out / mlp.out instead"
            )
        return expand(key, self.n_layers, set(self.points))

    def point(self, site: Site) -> Point:
        """The table entry of a site (module path with `{l}`, io, view)."""
        return self.points[site.point]

    def module_path(self, site: Site) -> str:
        """The dotted path of the module whose input or output holds the site."""
        return self.points[site.point].module.replace("{l}", str(site.layer))

    def module(self, site: Site) -> nn.Module:
        """The module whose input or output holds the site."""
        return self.module_at(self.module_path(site))

    def module_at(self, path: str) -> nn.Module:
        """The submodule at a dotted path, looked up afresh each time (a module may have been
        swapped, e.g. by resize_token_embeddings) through the `_modules` dicts: ~2 us against
        ~25 us for get_submodule's getattr chain, which is a sizeable share of entering a context.

        Raises:
            AttributeError: From `get_submodule`, if there is no such module.
        """
        module = self.model
        for part in path.split("."):
            child = module._modules.get(part)
            if child is None:
                return self.model.get_submodule(path)  # raises its own clear error
            module = child
        return module

    def axes(self, site: Site) -> tuple[str, ...]:
        """The site's axis names, e.g. `("batch", "pos", "head", "d_head")`."""
        return site_axes(site)

    def shape(self, site: Site) -> tuple[int | None, ...]:
        """The site's shape, with None for the axes that vary per forward (batch, pos, k_pos) and
        for an SAE's `d_sae` (the attached SAE's, not the model's)."""
        key = (site.point, site.part)
        if key not in self._shapes:
            self._shapes[key] = tuple(self.dims.size(axis) for axis in self.axes(site))
        return self._shapes[key]

    def hooks_of(self, site: Site) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
        """(module path, io) of the hook that sees `site` (None for attention sites, which are
        routed, not hooked), and of the layer-input hook whose tensor its view needs, if any.
        An SAE sub-site is computed by the hook of the site the SAE is attached at."""
        site = site.base
        if site not in self._hooks_of:
            point = self.point(site)
            hook = None if point.io == "attention" else (self.module_path(site), point.io)
            layer_input = (
                (self.module_path(Site("resid_pre", site.layer)), "input")
                if point.needs_layer_input
                else None
            )
            self._hooks_of[site] = (hook, layer_input)
        return self._hooks_of[site]

    def sites_at(self, key: tuple[str, str]) -> list[tuple[Site, Point]]:
        """Every (site, point) living at one (module path, io), in forward order (what one
        dispatcher hook serves)."""
        if self._by_hook is None:
            self._by_hook = {}
            for name in self.site_names():
                site = self.sites_of(name)[0]
                point = self.point(site)
                self._by_hook.setdefault((self.module_path(site), point.io), []).append((site, point))
        return self._by_hook.get(key, [])

    def site_names(self) -> list[str]:
        """Every site name of this model, in forward order."""
        return all_names(self.n_layers, set(self.points))
