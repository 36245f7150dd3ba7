"""The seed's import path of the activation store (`clt.training.data.ActivationStore`): see `clt.store`."""

from clt.store import *  # noqa: F403  (re-exports the store's public API)
from clt.store import __all__  # noqa: F401
