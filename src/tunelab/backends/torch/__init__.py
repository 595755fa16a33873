"""The PyTorch backend (CUDA, MPS, CPU) built on transformers and PEFT."""
