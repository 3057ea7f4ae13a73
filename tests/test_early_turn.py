"""A new session's first provider turn overlaps the store write, and nothing speaks early.

The store's writer is held here (each call waits until the test flushes it), so a test can
look at the instant between "the user message is being written" and "it is durable": the
provider may already have been asked, but no event, no text and no acknowledgement exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.python.failure import Failure

from gatewayd.agent.base import ProviderRequest, ProviderTurn, Usage
from gatewayd.config import Config
from gatewayd.runs import LiveRun
from tests.clockgw import OPERATOR, ClockGateway, GateProvider, SyncWriter, clock_gateway
from tests.clockgw import evolve_config as evolve


class HeldWriter(SyncWriter):
    """Each call waits in line until :meth:`flush`; ``failing`` makes the next ones fail."""

    def __init__(self, inner: SyncWriter) -> None:
        super().__init__(inner.conn)
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self.failing = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.held.append((fn, args, d))
        return d

    def flush(self) -> None:
        while self.held:
            fn, args, d = self.held.pop(0)
            if self.failing:
                d.errback(Failure(OSError("disk I/O error")))
            else:
                super().submit(fn, *args).chainDeferred(d)


class TalkingProvider(GateProvider):
    """Each turn keeps its ``on_text`` so the test can stream text whenever it likes."""

    def __init__(self) -> None:
        super().__init__()
        self.talk: list[Callable[[str], None]] = []
        self.requests: list[ProviderRequest] = []
        self.cancelled = 0

    def turn(
        self, request: ProviderRequest, on_text: Callable[[str], None]
    ) -> Deferred[ProviderTurn]:
        def cancel(_: Deferred[ProviderTurn]) -> None:
            self.cancelled += 1

        d: Deferred[ProviderTurn] = Deferred(cancel)
        self.waiting.append((d, request.messages[-1].content))
        self.talk.append(on_text)
        self.requests.append(request)
        return d


def held(tmp: str, config: Config | None = None) -> tuple[ClockGateway, HeldWriter, Any]:
    provider = TalkingProvider()
    cg = clock_gateway(tmp, config, provider=provider)
    writer = HeldWriter(cg.store._writer)  # type: ignore[arg-type]
    cg.store._writer = writer  # type: ignore[assignment]
    return cg, writer, provider


def submit(cg: ClockGateway, message: str, **kw: Any) -> list[Any]:
    results: list[Any] = []
    ensureDeferred(cg.gw.runs._submit(OPERATOR, message, **kw)).addBoth(results.append)
    return results


def test_first_turn_starts_while_the_message_is_stored(tmp_path: Any) -> None:
    cg, writer, provider = held(str(tmp_path))
    results = submit(cg, "hello")
    # the provider is asked at once, the store has not answered, and nothing was said
    assert [r.messages[-1].content for r in provider.requests] == ["hello"]
    assert results == [] and cg.events == []
    provider.talk[0]("Hel")  # text that arrives before the message is durable is held
    assert cg.of_type("text_delta") == []
    writer.flush()
    [live] = results
    assert isinstance(live, LiveRun)
    types = [e.type for e in cg.events]
    assert types[:3] == ["session_created", "run_started", "text_delta"]
    provider.talk[0]("lo")
    provider.waiting[0][0].callback(ProviderTurn(text="Hello", usage=Usage(1, 1)))
    writer.flush()  # the end of the run
    assert [e.payload["content"] for e in cg.of_type("text_delta")] == ["Hel", "lo"]
    [done] = cg.of_type("run_complete")
    assert done.payload["response"] == "Hello"
    assert len(provider.requests) == 1


def test_a_failed_store_write_stops_the_early_turn(tmp_path: Any) -> None:
    cg, writer, provider = held(str(tmp_path))
    results = submit(cg, "hello")
    assert len(provider.requests) == 1
    writer.failing = True
    writer.flush()
    [failure] = results
    assert isinstance(failure, Failure) and failure.check(OSError)
    assert provider.cancelled == 1
    assert cg.of_type("run_started") == [] and cg.gw.runs._reserved == 0
    assert cg.gw.runs.active_count == 0


def test_early_turns_hold_a_run_slot(tmp_path: Any) -> None:
    config = evolve(Config(), agent={"max_concurrent_runs": 1})
    cg, writer, provider = held(str(tmp_path), config)
    first = submit(cg, "one")
    second = submit(cg, "two")  # no slot is free: it waits for its turn, as queued runs do
    assert [r.messages[-1].content for r in provider.requests] == ["one"]
    writer.flush()
    assert len(first) == 1 and len(second) == 1
    assert [r.messages[-1].content for r in provider.requests] == ["one"]
    provider.release()  # "one" ends; "two" starts only now
    writer.flush()
    assert [r.messages[-1].content for r in provider.requests] == ["one", "two"]
    provider.release()
    writer.flush()
    assert len(cg.of_type("run_complete")) == 2 and cg.gw.runs._reserved == 0


def test_an_existing_session_waits_for_its_history(tmp_path: Any) -> None:
    cg, writer, provider = held(str(tmp_path))
    [first] = (submit(cg, "one"), writer.flush())[0]
    provider.release()
    writer.flush()
    submit(cg, "two", session_id=first.run.session_id)
    assert len(provider.requests) == 1  # its context is in the store: nothing starts early
    writer.flush()
    writer.flush()
    assert [m.content for m in provider.requests[1].messages] == ["one", "one", "two"]


def test_a_spent_budget_asks_nobody(tmp_path: Any) -> None:
    cg, writer, provider = held(str(tmp_path))
    cg.gw.runs._over_budget = lambda: True  # type: ignore[method-assign]
    results = submit(cg, "hello")
    assert provider.requests == []
    writer.flush()
    writer.flush()
    [live] = results
    assert live.run.error_code == "budget_exceeded"


def test_openai_context_is_the_early_turns_context(tmp_path: Any) -> None:
    cg, writer, provider = held(str(tmp_path))
    submit(
        cg, "and now?", context=(("user", "hi"), ("assistant", "hello")), instructions="Be brief"
    )
    [request] = provider.requests
    assert [(m.role, m.content) for m in request.messages] == [
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "and now?"),
    ]
    assert request.system.endswith("Be brief")
    writer.flush()
    assert len(provider.requests) == 1  # the run took the early turn; it did not ask again


def test_an_abort_cancels_the_turn_taken_early(tmp_path: Any) -> None:
    cg, writer, provider = held(str(tmp_path))
    results = submit(cg, "hello")
    writer.flush()
    [live] = results
    assert cg.gw.runs.abort(live.run.id)
    writer.flush()
    assert provider.cancelled == 1
    [aborted] = cg.of_type("run_aborted")
    assert aborted.run_id == live.run.id
    waiting = provider.waiting[0][0]
    assert waiting.called  # cancelled, and its CancelledError handled
    failures: list[Failure] = []
    waiting.addErrback(failures.append)
    assert failures == [] or failures[0].check(CancelledError)


def test_a_provider_that_raises_early_is_asked_again_by_the_run(tmp_path: Any) -> None:
    cg, writer, provider = held(str(tmp_path))
    calls: list[str] = []
    real_turn = provider.turn

    def turn(request: ProviderRequest, on_text: Callable[[str], None]) -> Any:
        calls.append(request.messages[-1].content)
        if len(calls) == 1:
            raise RuntimeError("a provider bug")
        return real_turn(request, on_text)

    provider.turn = turn
    results = submit(cg, "hello")
    assert calls == ["hello"] and cg.gw.runs._reserved == 0
    writer.flush()
    assert calls == ["hello", "hello"]  # the run asked again, the usual way
    provider.release()
    writer.flush()
    assert results[0].run.status == "completed" and cg.gw.runs._reserved == 0
    assert cg.gw.runs._submitting == {}
