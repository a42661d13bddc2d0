"""Plots the notebooks show, one function per figure; each returns its matplotlib ``Figure``.

Every function names the notebook that uses it. They only draw what they are
given: the numbers come from the other modules.
"""

from __future__ import annotations
