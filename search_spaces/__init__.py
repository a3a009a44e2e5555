"""Genomes for evolutionary merge search: a vector in the unit box <-> a merge Recipe.

`ps.ParameterSpace` is the parameter-space genome (per-source merge coefficients, optionally per
layer group and tensor family). Data-flow (layer path) and hybrid genomes come later.
"""

from search_spaces.ps import ParameterSpace

__all__ = ["ParameterSpace"]
