"""Model zoo for the paper's experiments, behind a small name -> factory registry.

Models carry no regularization code. Each one says where SIGReg belongs through two attributes,
consumed as ``sigreg.attach(model, model.sigreg_layers, pool=model.sigreg_pool)``:

* ``sigreg_layers: list[str]`` -- qualified names (as in ``model.named_modules()``) of the modules
  whose forward *output* is regularized;
* ``sigreg_pool: str`` -- how an output is reduced to one vector per sample. ``"mean"`` means:
  (B, T, C) token sequences -> mean over T; (B, C, H, W) feature maps -> mean over H, W;
  (B, C) vectors -> unchanged.

Registered names: ``paper-vit``, ``peak-vit``, ``mlp``, ``resnet18``.
"""

from sigreg.train.models.registry import MODELS, build_model, model_names, register_model

# Imported for their side effect: each module registers its factories.
from sigreg.train.models import mlp, resnet, vit  # noqa: F401  (isort: skip)

__all__ = ["MODELS", "build_model", "model_names", "register_model"]
