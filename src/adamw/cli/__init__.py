"""The command-line tools beside the optimizer, run as ``adamw COMMAND`` (see ``adamw.__main__``):
``bench`` times a step of every implementation, ``demo`` trains a small model with each low-bit mode.

The library is :mod:`adamw`; ``import adamw`` imports nothing from here.
"""
