"""Benchmarks of tfcompress against the tools a user would pick instead.

Run everything with ``python -m bench.run --out bench/out``; ``--smoke`` runs every item
at toy sizes to check the harness, and ``--only`` picks items. The run writes
``results.json`` and ``BENCHMARKS.md`` to the output folder (``--markdown`` writes the
Markdown elsewhere as well).
"""
