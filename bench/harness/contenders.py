"""The contender names every other harness module agrees on, with no dependency of its own.

spec (what a family declares), runner (how one item runs) and report (how results are shown) all
need them; keeping them here lets each of those import this module instead of one another.
"""

# Contender order is also the column order of the report and the colour order of the figures. A
# family with several peers names the second one "peer2", the third "peer3", ...
CONTENDERS = ("vitk", "eager", "compile", "peer")


def is_peer(contender: str) -> bool:
    return contender.startswith("peer")


def peer_index(contender: str) -> int:
    return int(contender[4:] or 1) - 1


def peer_contender(index: int) -> str:
    return "peer" if index == 0 else f"peer{index + 1}"


def ordered(names):
    """Contender names in report order: CONTENDERS, then further peers (peer2, peer3, ...)."""
    rank = {c: i for i, c in enumerate(CONTENDERS)}
    return sorted(names, key=lambda c: (rank.get(c, len(CONTENDERS)), peer_index(c) if is_peer(c) else 0))
