"""Genomes for evolutionary merge search: a vector in a box <-> a merge Recipe.

The parameter-space, data-flow-space and hybrid genomes land with the campaign loop
(issue 3); the Recipe they decode to is `evomerge.recipe.Recipe`.
"""
