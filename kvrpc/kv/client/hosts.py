"""Which of an engine's servers a rank talks to, when the engine spans several hosts.

An engine whose workers run on several hosts has one kvrpc server per host, and each worker
stores into and retrieves from the server of its own host (``shm`` and ``cuda_ipc`` copies
work only there). The engine is given the servers' URLs in host order; the rule here maps a
rank to its host. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["host_of_rank", "server_for_rank", "server_urls"]


def server_urls(url: str | Sequence[str]) -> list[str]:
    """``url`` as a list of URLs, one per host; raises ``ValueError`` for none or repeats.

    Each host has its own server: a URL given twice would ask one server twice for the
    same request, so it is refused rather than guessed at.
    """
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError("give at least one server URL")
    for each in urls:
        if not isinstance(each, str) or not each:
            raise ValueError(f"a server URL must be a non-empty string, not {each!r}")
    repeated = sorted({each for each in urls if urls.count(each) > 1})
    if repeated:
        raise ValueError(f"server URLs given more than once: {', '.join(repeated)}")
    return urls


def host_of_rank(rank: int, world_size: int, hosts: int) -> int:
    """The host (0-based, in the order of the URLs) of rank ``rank`` of ``world_size``.

    Ranks are split over the hosts in contiguous blocks, ``rank * hosts // world_size``:
    with 8 ranks on 2 hosts, ranks 0-3 are on host 0 and 4-7 on host 1. That is how vLLM
    places ranks on nodes (it numbers them node by node, the same count on every node).
    Raises ``ValueError`` for a rank outside ``0..world_size - 1`` or more hosts than
    ranks (a host without a rank would have a server no worker stores into).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if not 1 <= hosts <= world_size:
        raise ValueError(f"{hosts} hosts for {world_size} ranks; give 1 to {world_size}")
    return rank * hosts // world_size


def server_for_rank(urls: Sequence[str], rank: int, world_size: int) -> str:
    """The URL of the server on rank ``rank``'s host: ``urls[host_of_rank(...)]``."""
    return urls[host_of_rank(rank, world_size, len(urls))]
