"""Transitional: the file readers moved to tinyrwkv/formats/ and tinyrwkv/schema.py.

fast.py, golden.py and bench.py (restructured in another branch) still import these three names
from here; once they import them from .formats, delete this file. Nothing else may use it.
"""

from .formats.numerics import bf16_to_float32, to_bf16_bits
from .formats.safetensors import save_safetensors

__all__ = ["bf16_to_float32", "to_bf16_bits", "save_safetensors"]
