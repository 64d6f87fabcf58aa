"""Knowledge of models from other packages (Hugging Face transformers, timm), registered with the core.

Importing this package registers the ``hf`` and ``timm`` draw schemes with
:mod:`criticality.core.initializers` (``import criticality`` imports it).
"""

from criticality.adapters import initializers as initializers
