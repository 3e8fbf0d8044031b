"""internlm-adapter: train and move InternLM models with DeepSpeed and megatron-core.

Data flows one way: config (``adapter.config``) → plan (``adapter.runtime.layout``) →
model/engine → checkpoint. Importing this package imports neither torch nor megatron.
"""

__version__ = "0.1.0"
