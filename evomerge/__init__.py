"""evomerge: evolutionary search for model-merging recipes.

The names below load on first use, so importing the package (and `evomerge --help`) stays fast:
torch and transformers are imported only by the code that needs them.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "EvomergeError": "evomerge.errors",
    "METHODS": "evomerge.methods",
    "get_method": "evomerge.methods",
    "merge_tensor": "evomerge.methods",
    "Recipe": "evomerge.recipe",
    "Source": "evomerge.recipe",
    "SourceBank": "evomerge.bank",
    "load_recipe": "evomerge.loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")
