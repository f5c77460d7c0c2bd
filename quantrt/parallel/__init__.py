"""Tensor parallelism: one model over several processes (one per GPU; gloo on the CPU).

``plan`` holds the split rules (plain integers, shared with ``quantrt estimate``), ``comm``
the collectives, ``shard`` cuts a loaded model for one rank, ``executor`` and ``worker``
run the ranks: the scheduler lives on rank 0, which broadcasts each step's inputs.
"""
