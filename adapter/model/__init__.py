"""InternLM1 and InternLM2 built from megatron-core's tensor- and pipeline-parallel layers.

``build.build_model_chunks`` makes one ``GPTModel`` per virtual pipeline stage from a translated config;
``specs`` holds the layer spec (InternEvo's RMSNorm, the InternLM1 output-projection bias, packed-sequence
attention); ``mapping`` converts weights between InternEvo's logical state dict and the chunks.
Importing this package imports torch and megatron-core.
"""
