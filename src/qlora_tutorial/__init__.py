"""Helpers for the "QLoRA, step by step" notebooks.

Each module holds one concern and names, in its docstring, the notebook that
teaches it. The notebooks build an idea in plain code first, then import the
tested version from here.
"""

__version__ = "0.1.0"
