"""The serving process's frozen heap (``scorer.state``): a swap collects the old state's
garbage, frozen with it, and freezes again; a process that never froze is left alone."""

import gc
import weakref

from scorer.state import freeze_heap, refreeze_heap


class Node:
    pass


def test_a_swap_collects_the_frozen_old_state_and_refreezes_only_a_frozen_heap():
    gc.disable()  # only the collections under test may free the cycle
    try:
        gc.unfreeze()
        refreeze_heap()
        assert gc.get_freeze_count() == 0, "a process that never froze stays unfrozen"
        old = Node()
        old.me = old  # a cycle: only the cyclic collector can free it
        gone = weakref.ref(old)
        freeze_heap()  # the old state, frozen while it served
        del old  # the swap drops it
        gc.collect()
        assert gone() is not None, "frozen garbage is out of a plain collection's sight"
        refreeze_heap()
        assert gone() is None, "the swap unfreezes and collects the old state"
        assert gc.get_freeze_count() > 0, "and freezes the new one"
    finally:
        gc.unfreeze()
        gc.enable()
