"""Integrations with training frameworks; each submodule imports its framework lazily.

- :mod:`sigreg.integrations.lightning`: ``SIGRegCallback`` and ``regularize`` for PyTorch
  Lightning (``pip install "sigreg[lightning]"``).
- :mod:`sigreg.integrations.transformers`: ``SIGRegTrainer`` / ``SIGRegMixin`` for the
  Hugging Face ``Trainer`` (``pip install "sigreg[transformers]"``).

Importing this package imports neither framework.
"""
