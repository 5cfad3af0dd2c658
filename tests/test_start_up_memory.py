"""Start-up objects frozen out of the cyclic garbage collector's sight while serving
(core/start_up_memory.py): frozen inside, given back after, and a retired model's cycles
collected by `refreeze`."""

from __future__ import annotations

import gc
import weakref

from core.start_up_memory import frozen_start_up, refreeze


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_objects_made_before_serving_are_frozen_while_it_serves() -> None:
    assert gc.get_freeze_count() == 0
    with frozen_start_up():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0  # given back when serving ends


def test_parts_of_one_process_keep_it_frozen_until_the_last_ends() -> None:
    """`chatbot run`: the worker and the adapters serve side by side; one adapter ending must
    not give the others' objects back."""
    with frozen_start_up():
        with frozen_start_up():
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() > 0  # the other part still serves
    assert gc.get_freeze_count() == 0


def test_refreeze_collects_a_retired_models_cycles() -> None:
    retired = Node()  # made at start-up, like a model's modules
    alive = weakref.ref(retired)
    with frozen_start_up():
        del retired  # the model retired: only its cycle holds it
        gc.collect()
        assert alive() is not None  # frozen: a full collection does not see it
        refreeze()
        assert alive() is None
        assert gc.get_freeze_count() > 0  # the rest frozen again


def test_refreeze_does_nothing_when_nothing_is_frozen() -> None:
    refreeze()
    assert gc.get_freeze_count() == 0
