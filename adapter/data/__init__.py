"""InternEvo's training data: the tokenized on-disk format, packing, sampling and collation.

Reimplemented from InternEvo 0.5.2's semantics (``INTERNEVO_FORMAT.md`` §6) so that a config's data section
produces the very batches InternEvo would feed its model (checked against InternEvo-written batches).
"""
