"""splice: declarative, exact activation editing for Hugging Face transformers."""

import transformers as _transformers

from .compat import UntestedVersionWarning, check_transformers

from .architectures import ARCHITECTURES
from .architectures.base import Architecture, Dims, Point
from .edits import Edits
from .errors import SpliceError
from .directional import Apply, Clamp, Project, ProjectOut
from .interventions import Add, Intervention, Replace, Scale, Zero
from .sources import Mean, Patch, Resample
from .layout import Layout
from .loading import embedded_model_dir, load, load_hf
from .model import Model
from .recording import Recording
from .sweep import Sweep
from . import metrics, patching, plot, steering, tokens

__all__ = [
    "ARCHITECTURES", "Add", "Apply", "Clamp", "Project", "ProjectOut", "Architecture", "Dims", "Edits", "Intervention", "Layout", "Model", "Point",
    "Mean", "Patch", "Recording", "Replace", "Resample", "Scale", "SpliceError", "Sweep", "UntestedVersionWarning", "Zero", "metrics", "patching", "plot", "steering", "embedded_model_dir", "load", "load_hf",
]
__version__ = "0.1.0"
check_transformers(_transformers.__version__)
