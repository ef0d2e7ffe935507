"""Serving backends: ``hf`` (transformers, embedded) and ``vllm`` (vLLM's async engine)."""
