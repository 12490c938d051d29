"""sga: LLM unlearning by Smoothed Gradient Ascent, with fused Triton loss kernels."""
