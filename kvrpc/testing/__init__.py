"""Test support for transport authors: the conformance suite every transport must pass.

Import it from a test module (it needs pytest and pytest-asyncio)::

    from kvrpc.testing import TransportCase, TransportConformance

    class TestMyTransport(TransportConformance):
        @pytest.fixture
        def transport_case(self) -> TransportCase:
            return TransportCase("mine", make_url=lambda: f"mine://{uuid4().hex}")

``python -m kvrpc.testing URL`` serves the suite's protocols in a separate process.
"""

from kvrpc.testing.conformance import (
    BLOCK,
    RECORD,
    SLEEP,
    TransportCase,
    TransportConformance,
    open_fds,
    serve_conformance,
)

__all__ = [
    "BLOCK",
    "RECORD",
    "SLEEP",
    "TransportCase",
    "TransportConformance",
    "open_fds",
    "serve_conformance",
]
