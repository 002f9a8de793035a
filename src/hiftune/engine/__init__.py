"""The engine: HiFT on any ``torch.optim.Optimizer``, with nothing but PyTorch and safetensors.

Bottom layer of hiftune: it imports neither ``transformers`` nor anything above it (``memory``,
``integrations``, ``recipes``, ``cli``), so a plain PyTorch loop pays only for these modules.
"""
