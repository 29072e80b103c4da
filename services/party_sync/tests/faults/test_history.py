"""The fault tier's history check (``ps_testkit.fault_history``) on small hand-made histories:
each rule is shown to pass a correct history and to catch the broken one."""

from __future__ import annotations

from typing import Any

from ps_testkit.fault_history import (
    ClientHistory,
    Frame,
    check_consistency,
    check_history,
    check_seqs,
    connection_stats,
    converged,
    log_errors,
    playable,
    recovery_times,
)

EPOCH = "ep-1"


class Recorder:
    """Builds one client's history, one frame per call, at times 1, 2, 3, ..."""

    def __init__(self, character: str) -> None:
        self.history = ClientHistory(character)
        self.conn = -1
        self.t = 0.0

    def _add(self, kind: Any, message: dict[str, Any] | None = None, **extra: Any) -> Recorder:
        self.t += 1.0
        self.history.frames.append(Frame(self.t, self.conn, kind, message, **extra))
        return self

    def open(self) -> Recorder:
        self.conn += 1
        return self._add("open", url="ws://node/ws")

    def hello(self, seq: int, *, epoch: str = EPOCH, resumed_from: int | None = None) -> Recorder:
        payload: dict[str, Any] = {"epoch": epoch, "seq": seq, "resumed": resumed_from is not None}
        if resumed_from is not None:
            payload["resumed_from"] = resumed_from
        return self._add("recv", {"type": "system.hello", "payload": payload})

    def act(self, action_id: str) -> Recorder:
        message = {"type": "action.request", "payload": {"action_id": action_id}}
        return self._add("sent", message)

    def event(self, seq: int, type_: str = "scene.update", **payload: Any) -> Recorder:
        return self._add("recv", {"type": type_, "seq": seq, "payload": payload})

    def result(self, seq: int, action_id: str) -> Recorder:
        return self.event(seq, "action.result", action_id=action_id)

    def error(self, action_id: str, code: str) -> Recorder:
        payload = {"code": code, "in_reply_to": {"type": "action.request", "action_id": action_id}}
        return self._add("recv", {"type": "system.error", "payload": payload})

    def close(self, code: int = 1006) -> Recorder:
        return self._add("close", code=code)


def test_a_clean_history_passes_with_its_figures() -> None:
    a = Recorder("aria").open().hello(0).act("a-1").result(1, "a-1").act("a-2").result(2, "a-2")
    b = Recorder("borin").open().hello(0).result(1, "a-1").result(2, "a-2")
    verdict = check_history([a.history, b.history], ["a-1", "a-2"])
    assert verdict.problems == []
    assert verdict.figures() == {
        "actions_sent": 2,
        "answered": 2,
        "answered_once": 2,
        "results": 2,
        "refusals": {},
        "applied": 2,
        "applied_once": 2,
        "lost": 0,
        "lost_applied": 0,
        "false_failures": 0,
    }


def test_a_resend_answered_with_the_original_result_is_one_answer() -> None:
    a = Recorder("aria").open().hello(0).act("a-1").result(1, "a-1").close()
    a.open().hello(1, resumed_from=1).act("a-1").result(1, "a-1")  # the original, old seq
    verdict = check_history([a.history], ["a-1"])
    assert verdict.problems == []
    assert verdict.answered_once == 1


def test_a_repeat_sent_with_the_last_seq_before_its_event_is_one_answer() -> None:
    """docs/protocol.md: a repeat whose seq the connection's stream has not passed yet carries
    the connection's last seq (here 11, which is another event), and the event follows in
    order. One answer, and no (epoch, seq) seen two ways (a failover run's false alarm)."""
    a = Recorder("aria").open().hello(10).act("a-1").event(11, "party.join", who="borin")
    a.act("a-1").result(11, "a-1").result(12, "a-1")
    b = Recorder("borin").open().hello(10).event(11, "party.join", who="borin").result(12, "a-1")
    verdict = check_history([a.history, b.history], ["a-1"])
    assert verdict.problems == []
    assert verdict.answered_once == 1
    # A repeat of another epoch's result, with its original seq: not the stream's event there.
    c = Recorder("cora").open().hello(20, epoch="ep-2").act("a-1").result(5, "a-1")
    d = Recorder("dain").open().hello(4, epoch="ep-2").event(5, title="Gate")
    assert check_consistency([c.history, d.history]) == []
    # Two different results are still two answers, whatever seq the repeat carries.
    e = Recorder("aria").open().hello(10).act("a-1").event(11)
    e.act("a-1").result(11, "a-1").event(12, "action.result", action_id="a-1", other=True)
    verdict = check_history([e.history], ["a-1"])
    assert any("a-1 answered 2 ways" in p for p in verdict.problems)


def test_an_action_never_answered_is_lost_and_said_to_be_applied_when_it_was() -> None:
    a = Recorder("aria").open().hello(0).act("a-1").act("a-2").error("a-2", "action_in_flight")
    verdict = check_history([a.history], ["a-2"])
    assert verdict.lost == 2 and verdict.lost_applied == 1
    assert "aria: a-1 never answered" in verdict.problems
    assert "aria: a-2 never answered (the chronicle shows it applied)" in verdict.problems


def test_two_different_answers_to_one_action_are_caught() -> None:
    a = Recorder("aria").open().hello(0).act("a-1").error("a-1", "action_timeout")
    a.result(1, "a-1")
    verdict = check_history([a.history], ["a-1"])
    assert verdict.answered == 1 and verdict.answered_once == 0
    assert any("a-1 answered 2 ways" in p for p in verdict.problems)
    assert "aria: told action_timeout about a-1, which the chronicle shows applied" in (
        verdict.problems
    )
    assert verdict.false_failures == 1


def test_the_same_refusal_twice_is_one_answer_and_true_when_not_applied() -> None:
    a = Recorder("aria").open().hello(0).act("a-1").error("a-1", "backend_unavailable")
    a.act("a-1").error("a-1", "backend_unavailable")
    verdict = check_history([a.history], [])
    assert verdict.problems == []
    assert verdict.refusals == {"backend_unavailable": 1}


def test_backend_unavailable_is_no_answer_beside_a_result_and_no_false_failure() -> None:
    """About an action, ``backend_unavailable`` says its outcome is unknown (docs/protocol.md):
    a node that accepted it and could not append it to its stream says so and appends it again;
    the engine may apply it. Not a false failure, and not a second answer beside its result."""
    a = Recorder("aria").open().hello(0).act("a-1").error("a-1", "backend_unavailable")
    a.result(1, "a-1")
    verdict = check_history([a.history], ["a-1"])
    assert verdict.problems == [] and verdict.answered_once == 1 and verdict.results == 1
    alone = Recorder("cora").open().hello(0).act("c-7").error("c-7", "backend_unavailable")
    verdict = check_history([alone.history], ["c-7"])
    assert verdict.problems == [] and verdict.false_failures == 0
    timeout = Recorder("dana").open().hello(0).act("d-1").error("d-1", "action_timeout")
    assert check_history([timeout.history], ["d-1"]).false_failures == 1  # final: still caught


def test_applied_twice_and_a_result_the_chronicle_lacks_are_caught() -> None:
    a = Recorder("aria").open().hello(0).act("a-1").result(1, "a-1").result(2, "b-9")
    verdict = check_history([a.history], ["a-1", "a-1"])
    assert "aria: a-1 applied 2 times" in verdict.problems
    assert "action.result for b-9, which the chronicle lacks" in verdict.problems
    assert verdict.applied == 1 and verdict.applied_once == 0


def test_seqs_must_follow_the_hello_without_gap_or_duplicate() -> None:
    ok = Recorder("aria").open().hello(3).event(4).event(5)
    assert check_seqs(ok.history) == []
    gap = Recorder("aria").open().hello(3).event(4).event(6).event(7)
    assert check_seqs(gap.history) == [
        "aria conn 0: gap: expected seq 5, got 6 (scene.update) in epoch ep-1"
    ]
    dup = Recorder("aria").open().hello(3).event(4).event(4)
    assert check_seqs(dup.history) == ["aria conn 0: duplicate scene.update at seq 4 (expected 5)"]
    early = Recorder("aria").open().event(1)
    assert check_seqs(early.history) == ["aria conn 0: scene.update 1 before hello"]


def test_a_resume_continues_the_clients_own_seq_and_a_snapshot_resyncs() -> None:
    h = Recorder("aria").open().hello(2).event(3).close()
    h.open().hello(5, resumed_from=3).event(4).event(5).close()  # replay 4..5
    h.open().hello(9, epoch="ep-2").event(10)  # a new epoch: a fresh snapshot
    h.open().hello(2).event(3)  # resumed: false in any epoch is a resync
    assert check_seqs(h.history) == []
    wrong = Recorder("aria").open().hello(2).event(3).close()
    wrong.open().hello(5, resumed_from=4).event(5)
    assert check_seqs(wrong.history) == [
        "aria conn 1: resumed from 4 in epoch ep-1, but the client had seq 3 of it"
    ]


def test_one_epoch_and_seq_is_one_message_for_everyone() -> None:
    a = Recorder("aria").open().hello(0).event(1, title="Gate")
    b = Recorder("borin").open().hello(0).event(1, title="Gate")
    assert check_consistency([a.history, b.history]) == []
    c = Recorder("cora").open().hello(0).event(1, title="Mill")
    c.open().hello(0, epoch="ep-2").event(1, title="Ford")  # another epoch: another stream
    [problem] = check_consistency([a.history, c.history])
    assert problem.startswith("epoch ep-1 seq 1: aria saw scene.update")


def test_recovery_is_the_first_own_result_after_the_faults_end() -> None:
    a = Recorder("aria").open().hello(0).act("a-1").result(1, "a-1")  # t = 3, 4
    a.act("a-2").error("a-2", "backend_unavailable").act("a-3").result(2, "a-3")  # t = 5..8
    b = Recorder("borin").open().hello(0).result(1, "a-1")
    assert recovery_times([a.history, b.history], fault_end=4.5) == {"aria": 3.5, "borin": None}


def test_connection_stats() -> None:
    h = Recorder("aria").open().hello(0).close(1006).open().hello(0, resumed_from=0).close(4003)
    h.open().hello(5, epoch="ep-2")
    assert connection_stats(h.history) == {
        "connections": 3,
        "resumed": 1,
        "snapshots": 2,
        "closed_1006": 1,
        "closed_4003": 1,
    }


SCENE = {"scene_number": 2, "scene_id": "mill", "options": [{"id": "onward", "label": "Go on"}]}


def _hello(**changes: Any) -> dict[str, Any]:
    hello: dict[str, Any] = {
        "epoch": EPOCH,
        "seq": 7,
        "status": "active",
        "run_status": "in_progress",
        "members": [{"character_id": "aria", "display_name": "Aria", "online": True}],
        "scene": SCENE,
        "combat": None,
        "party_state": {"run_status": "in_progress"},
        "vote": None,
    }
    hello.update(changes)
    return hello


def test_converged_compares_what_a_client_folds_with_a_fresh_hello() -> None:
    assert converged(_hello(), _hello(you="borin", limits={})) == []
    mine = {"vote_id": "v", "voted": 1, "your_vote": "onward"}
    assert converged(_hello(vote=mine), _hello(vote={**mine, "your_vote": None})) == []
    [diff] = converged(_hello(vote=mine), _hello(vote={**mine, "voted": 2}))
    assert diff.startswith("vote:")
    [diff] = converged(_hello(seq=6), _hello())
    assert diff.startswith("seq: 6 != hello's 7")
    offline = [{"character_id": "aria", "display_name": "Aria", "online": False}]
    [diff] = converged(_hello(members=offline), _hello())
    assert diff.startswith("members:")


def test_playable_needs_a_scene_with_options_and_the_connected_online() -> None:
    assert playable(_hello(), ["aria"]) == []
    assert playable(_hello(scene=None, run_status="pending"), []) == [
        "the fresh hello has no scene",
        "the fresh hello says run_status pending",
    ]
    assert playable(_hello(scene={**SCENE, "options": []}), []) == [
        "the fresh hello's scene mill has no options"
    ]
    assert playable(_hello(), ["aria", "borin"]) == [
        "borin is connected but the fresh hello shows them offline"
    ]


def test_log_errors_counts_errors_and_tracebacks() -> None:
    log = "\n".join(
        [
            "engine worker w1 on party_sync:actions",
            "2026-12-02 06:24:01,345 ERROR party_sync.engine.stream_worker: engine failed",
            "Traceback (most recent call last):",
            '  File "x.py", line 1, in f',
            "2026-12-02 06:24:02,000 WARNING party_sync: a warning",
            "2026-12-02 06:24:03,345 ERROR party_sync.engine.stream_worker: engine failed",
        ]
    )
    assert log_errors(log) == {
        "errors": 2,
        "tracebacks": 1,
        "first": ["ERROR party_sync.engine.stream_worker: engine failed"],
    }
    assert log_errors("all quiet") == {"errors": 0, "tracebacks": 0, "first": []}
