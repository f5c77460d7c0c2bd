"""Quantization methods: a registry of ``QuantConfig`` classes and their layer methods."""
