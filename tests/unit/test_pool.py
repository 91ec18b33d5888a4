"""Pool decisions that need no event loop: when a freed server moves to another worker."""

import pytest

from workers.pool import narrows_gap


@pytest.mark.parametrize("held, share, their_held, their_share", [
    (8, 7.5, 8, 8.5),  # a gap of one: a move would only mirror it
    (9, 8.5, 7, 7.5),  # the mirror image of the same
    (8, 8.0, 8, 8.0),  # balanced
    (8, 8.0, 7, 8.0),  # a gap of one
    (6, 7.0, 2, 9.0),  # below its own share: it keeps what it has
])
def test_no_move_that_would_come_straight_back(held, share, their_held, their_share):
    assert not narrows_gap(held, share, their_held, their_share)


@pytest.mark.parametrize("held, share, their_held, their_share", [
    (9, 8.0, 7, 8.0),
    (10, 8.0, 6, 8.0),
    (12, 9.25, 4, 6.75),  # skewed clients, servers not following yet
])
def test_a_move_that_narrows_the_gap(held, share, their_held, their_share):
    assert narrows_gap(held, share, their_held, their_share)
    assert not narrows_gap(their_held + 1, their_share, held - 1, share)  # no bounce back
