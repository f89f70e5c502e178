"""Triton kernels behind ``vlmopt::`` ops on CUDA. Importing a kernel module imports triton; the ops
import them only when they run on a GPU, so ``import vlmopt`` never does."""
