"""kvrpc inside inference engines: one subpackage per engine, each an optional extra.

``import kvrpc`` never imports these; importing a subpackage imports only what it needs until
its engine's own classes are asked for.
"""
