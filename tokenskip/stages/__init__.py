"""The dataset build's Ray Data stages, one module each, in pipeline order.

    generate  (:mod:`.generate`)  problem rows -> problem rows + their n samples (vLLM)
    grade     (:mod:`.grade`)     problem rows -> n sample rows each, with verdict and status
    compress  (:mod:`.compress`)  sample rows -> sample rows + compressions of the kept ones
    write     (:mod:`.write`)     sample rows -> one write result per shard (parts written)

Each module declares its :class:`~.contract.StageContract` (``CONTRACT``): the Arrow fields its stage
requires (``INPUT_FIELDS``) and the ones it produces (``OUTPUT_FIELDS`` appended to its input, or a
whole ``OUTPUT_SCHEMA``). The plan checks the whole chain before any engine starts
(:func:`tokenskip.pipeline.stage_chain`, printed by ``--dry-run``), and each stage checks every batch
against its inputs (:mod:`.contract`), so a stage fed the wrong rows fails with the missing field's
name instead of a ``KeyError`` deep inside. Each module's ``STAGE`` is its name from
:data:`tokenskip.schema.STAGES`, the ``stage`` it writes on the reject and error rows it makes.
:mod:`tokenskip.pipeline` only wires them.
Nothing is imported here: a write worker should not load the generation stage's dependencies.
"""
