"""Sparse autoencoders (SAEs): load and save SAELens' format, accept any SAE module, and find
the site an SAE belongs at.

- `load(path)` reads a folder in SAELens' format (`cfg.json` + `sae_weights.safetensors`,
  written by SAELens 6 or earlier) into a `SparseAutoencoder`, with no SAELens install;
  `save(sae, path)` writes that format back, for SAELens to read. Only safetensors is read:
  nothing is unpickled.
- `SparseAutoencoder` computes the standard (ReLU), JumpReLU and TopK architectures exactly as
  SAELens does; `SAEConfig` describes one.
- `as_sae(obj)` accepts any `nn.Module` with `encode(x)` and `decode(acts)` as it is (a
  SAELens `SAE`, dictionary_learning's, sparsify's, your own).
- `resolve_site` turns an SAE's TransformerLens `hook_name` into a splice site, and
  `check_fits` checks that its `d_in` matches the site's width.

Example:
    >>> import tempfile, torch
    >>> from splice import sae as saes
    >>> cfg = saes.SAEConfig("jumprelu", d_in=16, d_sae=64, hook_name="blocks.1.hook_resid_post")
    >>> sae = saes.SparseAutoencoder(cfg)
    >>> folder = tempfile.mkdtemp()
    >>> _ = saes.save(sae, folder)
    >>> loaded = saes.load(folder)
    >>> loaded.encode(torch.randn(2, 3, 16)).shape
    torch.Size([2, 3, 64])
    >>> saes.resolve_site(loaded, 2)
    'blocks.1.resid_post'
"""

from ..engine.autoencoders import as_sae
from .config import ARCHITECTURES, SAEConfig
from .files import load, save
from .latents import FeatureSteer, feature_direction, top_features
from .modules import SparseAutoencoder
from .sites import check_fits, resolve_site

__all__ = [
    "load",
    "save",
    "SparseAutoencoder",
    "SAEConfig",
    "ARCHITECTURES",
    "as_sae",
    "resolve_site",
    "check_fits",
    "top_features",
    "FeatureSteer",
    "feature_direction",
]
