"""splice: declarative, exact activation editing for Hugging Face transformers.

Layers, each importing only the ones below it: `splice.errors` / `splice.compat`;
`splice.architectures` (one table per family, and the views that cut sites out of module
tensors); `splice.engine` (sites, selections, interventions, registries, recordings, the layout,
the pure plan, the hooks, `Model`); `splice.sweeps` (data, prefix replay, checkpoints, metrics,
tables); and the features on top (`patching`, `steering`, `plot`, `strategies`, `loading`, `spec`, `cli`).
Everything a user imports is listed in `__all__`; internals stay importable from their modules.
"""

import transformers as _transformers

from . import analysis, circuits, geometry, lens, patching, plot, sae, steering
from .activations import ActivationStore, cache_activations
from .architectures import ARCHITECTURES
from .architectures.table import Architecture, Dims, Point
from .compat import UntestedVersionWarning, check_transformers
from .engine import tokens as tokens  # splice.tokens: text <-> token helpers
from .engine.directional import Apply, Clamp, Project, ProjectOut
from .engine.edits import Edits
from .engine.interventions import Add, Intervention, Replace, Scale, Zero
from .engine.layout import Layout
from .engine.model import Model
from .engine.recording import Recording
from .engine.sources import Mean, Patch, Resample
from .engine.spliced import SAE
from .errors import SpliceError
from .loading import embedded_model_dir, load_hf
from .spec import ModelSpec, load
from .sweeps import metrics
from .sweeps.ray_executor import RayExecutor
from .sweeps.sweep import Sweep
from .sweeps.tables import grid
from .version import __version__ as __version__

__all__ = [
    # the model and its contexts
    "Model",
    "load",
    "load_hf",
    "ModelSpec",
    "embedded_model_dir",
    "Edits",
    "Recording",
    "Layout",
    # interventions
    "Intervention",
    "Zero",
    "Scale",
    "Replace",
    "Add",
    "Project",
    "ProjectOut",
    "Clamp",
    "Apply",
    "Patch",
    "Mean",
    "Resample",
    "SAE",
    # activations to disk
    "cache_activations",
    "ActivationStore",
    # sweeps and features
    "Sweep",
    "RayExecutor",
    "grid",
    "metrics",
    "analysis",
    "patching",
    "circuits",
    "steering",
    "plot",
    "lens",
    "geometry",
    "sae",
    # architectures
    "ARCHITECTURES",
    "Architecture",
    "Dims",
    "Point",
    # errors and warnings
    "SpliceError",
    "UntestedVersionWarning",
]
check_transformers(_transformers.__version__)
