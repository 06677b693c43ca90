"""sigreg: Sketched Isotropic Gaussian Regularization for PyTorch.

One line regularizes any model::

    handle = sigreg.attach(model, "blocks.*")          # weak SIGReg, K=64, alpha=0.1
    loss = handle.combine(criterion(model(x), y))

References: Weak-SIGReg (arXiv 2603.05924); LeJEPA (arXiv 2511.08544).
"""

from ._version import __version__ as __version__
from .attach import FeatureRecorder, SIGRegHandle, attach, pool_features, resolve_layers
from .distributed import all_reduce_sum, is_distributed
from .functional import regularized_loss, strong_sigreg, vicreg_varcov, weak_sigreg
from .modules import StrongSIGReg, VarCovReg, WeakSIGReg, make_regularizer
from .sketch import draw_directions, draw_sketch, seeded_generator

__all__ = [
    "FeatureRecorder",
    "SIGRegHandle",
    "StrongSIGReg",
    "VarCovReg",
    "WeakSIGReg",
    "all_reduce_sum",
    "attach",
    "draw_directions",
    "draw_sketch",
    "is_distributed",
    "make_regularizer",
    "pool_features",
    "regularized_loss",
    "resolve_layers",
    "seeded_generator",
    "strong_sigreg",
    "vicreg_varcov",
    "weak_sigreg",
]
