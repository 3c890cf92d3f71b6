"""Backbone adapters: turn a Hugging Face model into one whose FFNs are UB-SMoE sparse blocks.

``native`` converts natively sparse decoders (OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral);
``tiny`` builds small random models of those families and an offline tokenizer for tests.
"""
