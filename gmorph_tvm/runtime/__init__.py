"""Run stage: load an exported artifact (:func:`load`) locally, or benchmark it over RPC."""

from .loader import Runner, load, random_inputs

__all__ = ["Runner", "load", "random_inputs"]
