"""sga: LLM unlearning by Smoothed Gradient Ascent, with fused Triton loss kernels."""
from pkgutil import extend_path

# The subpackage sga.kernels is installed from kernels/sga_kernels/, outside this folder. Run from a checkout with
# the project installed as a wheel, this folder (first on sys.path) would hide the installed sga/kernels/:
# extend_path adds every other sga/ folder on sys.path to this package's search path.
__path__ = extend_path(__path__, __name__)
