"""The teacher-token cache: content-addressed, memory-mapped, bounded and self-healing entries
(``features``), and its inspection and least-recently-used pruning (``admin``)."""
