"""Helpers for the "QLoRA, step by step" notebooks.

Each module holds one concern and names, in its docstring, the notebook that
teaches it. The notebooks build an idea in plain code first, then import the
tested version from here.
"""

import logging

# On AVX512-BF16 CPUs bitsandbytes logs, at import, that it could not fetch an optional inference kernel from the
# Hub ("Failed to load CPU gemm_4bit_forward from kernels-community"). The series never uses that kernel (see
# cpu_packing and notebook 02), so the line teaches nothing after 02 explains it; set before bitsandbytes loads.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
