"""exl2opt: choose a quantized LLM variant and its runtime settings under a VRAM budget.

The package is layered so that data flows one way:
source -> variants (metadata only) -> configurations -> VRAM verdict -> study -> measurements -> reports.
"""

__version__ = "0.1.0"
