"""evomerge: evolutionary search for model-merging recipes."""

from evomerge.bank import SourceBank
from evomerge.errors import EvomergeError
from evomerge.methods import METHODS, get_method, merge_tensor
from evomerge.recipe import Recipe, Source

__all__ = ["EvomergeError", "METHODS", "Recipe", "Source", "SourceBank", "get_method", "merge_tensor"]
__version__ = "0.1.0"
