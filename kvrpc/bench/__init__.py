"""``kvrpc bench ...``: the benchmarks (rpc, kv, gpu, e2e, slow-reader) and their child helper.

Each module is one command; the CLI imports it only when that command runs, so ``import
kvrpc`` never pays for them.
"""
