"""The tensor table: every weight tensor of every format, declared once.

``atoms``: the tensors all formats agree on (shapes, presence, units); ``stored``: how one format stores
atoms (fusion and tensor-parallel split, written once); ``table``: a format's list of stored tensors and the
unit-wise conversion between any two tables; ``mcore``: megatron-core's names, shared by the model and both
Megatron checkpoint formats. Families (``adapter.families``) declare InternEvo's and Hugging Face's tables.
"""
