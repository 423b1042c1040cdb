"""The serving process's frozen heap (``scorer.state``): a swap collects what it left
behind and freezes again, and a process that never froze is left alone."""

import gc
import weakref

from scorer.state import freeze_heap, refreeze_heap


class Node:
    pass


def _dropped_cycle() -> weakref.ref:
    """A reference cycle no one holds: only the cyclic collector can free it."""
    node = Node()
    node.me = node
    return weakref.ref(node)


def test_a_swap_collects_and_refreezes_only_a_frozen_heap():
    gc.disable()  # only the collections under test may free the cycles
    try:
        gc.unfreeze()
        refreeze_heap()
        assert gc.get_freeze_count() == 0, "a process that never froze stays unfrozen"
        freeze_heap()
        assert gc.get_freeze_count() > 0
        gone = _dropped_cycle()  # garbage of the old state, made after the first freeze
        refreeze_heap()
        assert gone() is None, "the swap's garbage is collected before the new freeze"
        assert gc.get_freeze_count() > 0, "and the new state is frozen again"
    finally:
        gc.unfreeze()
        gc.enable()
