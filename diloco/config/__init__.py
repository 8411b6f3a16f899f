"""Run configuration: the typed schema, YAML loading, ``--set`` overrides and validation.

:mod:`diloco.config.schema` holds the sections and their defaults, loading and the reference;
:mod:`diloco.config.rules` the ranges and cross-field rules; :mod:`diloco.config.defaults` the
defaults the library (:class:`diloco.DiLoCo`) shares with the schema. Nothing here imports
torch: configs are loaded and checked before any heavy import.
"""

from diloco.config.schema import *  # noqa: F403 (the package exports the schema's API)
from diloco.config.schema import __all__ as __all__
