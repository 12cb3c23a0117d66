"""Benchmark harnesses: ``gnflex bench cpu`` and ``gnflex bench cuda``.

They live in the package so an installed gnflex can measure itself; the
scripts under bench/ in a checkout call the same code. Results for the record
go to bench/results/ with the machine they ran on.
"""
