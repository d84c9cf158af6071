"""The rebalance bench's arithmetic: pauses, stalls and join -> consuming from samples."""

from __future__ import annotations

from bench.rebalance import Event, Observer, Sample, judge, longest_gap


def _s(t: float, committed: dict[int, int], owners: dict[int, str]) -> Sample:
    return Sample(t, committed, owners, frozenset(owners.values()))


def test_longest_gap_is_the_longest_stretch_without_a_commit() -> None:
    samples = [
        _s(0.0, {0: 10, 1: 10}, {}),
        _s(0.1, {0: 11, 1: 10}, {}),  # 0 commits
        _s(0.2, {0: 11, 1: 11}, {}),  # 1 commits
        _s(0.9, {0: 12, 1: 11}, {}),  # 0 commits after 0.7 s of nothing
        _s(1.0, {0: 12, 1: 11}, {}),
    ]
    assert abs(longest_gap(samples, None, 0.0, 1.0) - 0.7) < 1e-9
    # Partition 1 alone commits at 0.2 and then not until the window's end.
    assert abs(longest_gap(samples, {1}, 0.0, 1.0) - 0.8) < 1e-9
    # A window with no samples is one gap.
    assert longest_gap([], None, 0.0, 2.0) == 2.0


def test_judge_counts_moved_partitions_and_the_new_members_first_commit() -> None:
    obs = Observer("unused:1", "g")
    a, b = {0: "h0", 1: "h0"}, {0: "h0", 1: "h1"}
    obs.samples = [
        _s(9.9, {0: 5, 1: 5}, a),
        _s(10.0, {0: 6, 1: 6}, a),
        _s(10.5, {0: 7, 1: 6}, {**a}),
        Sample(10.6, {0: 7, 1: 6}, a, frozenset({"h0", "h1"})),  # h1 has joined
        _s(11.0, {0: 8, 1: 6}, b),  # h1 is given partition 1 at offset 6
        _s(11.4, {0: 9, 1: 6}, b),
        _s(11.6, {0: 10, 1: 9}, b),  # h1's first commit
    ]
    e = judge(obs, "join", "h1", 10.05)
    assert isinstance(e, Event) and e.moved == 1
    assert abs(e.stall_s - (11.6 - 10.05)) < 1e-9  # partition 1: nothing from 10.05 to 11.6
    assert e.join_to_consume_s is not None and abs(e.join_to_consume_s - 1.0) < 1e-9
    assert e.start_to_consume_s is not None and abs(e.start_to_consume_s - 1.55) < 1e-9
    assert abs(e.pause_s - 0.5) < 1e-9  # 10.5 -> 11.0, the group's longest stop


def test_a_moved_partitions_stall_is_its_own_not_the_moved_sets() -> None:
    """Partition 0 keeps committing and partition 1 stalls: the stall is partition 1's."""
    obs = Observer("unused:1", "g")
    a, b = {0: "h0", 1: "h0"}, {0: "h1", 1: "h1"}
    obs.samples = [
        _s(10.0, {0: 6, 1: 6}, a),
        _s(10.5, {0: 7, 1: 6}, a),
        _s(11.0, {0: 8, 1: 6}, b),
        _s(11.4, {0: 9, 1: 6}, b),
        _s(11.6, {0: 10, 1: 9}, b),
    ]
    e = judge(obs, "join", "h1", 10.05)
    assert e.moved == 2
    assert abs(e.stall_s - 1.55) < 1e-9  # partition 1, 10.05 -> 11.6
    assert e.join_to_consume_s is not None and abs(e.join_to_consume_s - 0.4) < 1e-9
