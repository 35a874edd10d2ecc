"""Triton kernels. They know nothing of graphs, autograd or patterns."""
