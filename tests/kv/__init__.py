"""The KV server's tests: the state core's rules (test_state), end to end (test_service), parts.

A package, so that test_service imports its harness from this folder's conftest unambiguously.
"""
