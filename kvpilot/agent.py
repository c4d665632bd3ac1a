"""Run task episodes through the real engine: the agent loop of tool-using tasks.

A turn is one Generate request on the episode's session. When the model ends a turn with a tool call (the
episode's stop string, e.g. `</call>`), the environment's reply is appended to the session as a tool output
and the model continues; the KV cache, compressed or not, carries over between turns. `run_episodes` drives
many episodes at once on the synchronous engine (continuous batching across episodes); `run_episode_grpc`
drives one over gRPC and streams it to a terminal (the demo).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

from decoder_service.engine import Engine
from decoder_service.oracle import FutureAttention
from decoder_service.requests import (
    CompressionConfig,
    EvictionEvent,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    SegmentKind,
)
from kvpilot.tasks import Episode


@dataclass
class EpisodeResult:
    episode: Episode
    text: str = ""  # everything the model wrote, turns joined by spaces
    correct: bool = False
    answered: bool = False
    turns: int = 0
    total_tokens: int = 0  # sequence length at the end: prompt + tool outputs + model text
    generated_tokens: int = 0
    peak_kv_slots: int = 0
    evicted_tokens: int = 0
    compression_events: int = 0
    fallbacks: int = 0
    # Side threads (policy sidequest): how many ran, their tokens, cut ones, tool outputs they dropped, ignored ids.
    side_threads: int = 0
    side_tokens: int = 0
    side_cut: int = 0
    dropped_tool_outputs: int = 0
    side_ignored: int = 0
    kv_reads: int = 0  # KV slots attended over all decode steps (per layer and KV head)
    reissued: int = 0  # tool calls answered again because their earlier output had been dropped (SideQuest)
    finish: str = ""
    evictions: list[EvictionEvent] = field(default_factory=list)
    # The whole sequence at the end (<bos>, prompt, model turns, tool outputs: the session's history) and its
    # segments (start, end, kind) with kind user / tool / model: a reference trace for golden and replay.
    token_ids: list[int] = field(default_factory=list, repr=False)
    segments: list[tuple[int, int, str]] = field(default_factory=list, repr=False)

    def add_turn(self, text: str, usage) -> None:
        """Fold one turn's final text and usage (engine Usage or the protobuf's) into the episode totals."""
        self.turns += 1
        self.text = f"{self.text} {text}".strip()
        self.generated_tokens += usage.generated_tokens
        self.peak_kv_slots = max(self.peak_kv_slots, usage.peak_kv_slots)
        self.evicted_tokens += usage.evicted_tokens
        self.compression_events += usage.compression_events
        self.fallbacks += usage.fallbacks
        for name in ("side_threads", "side_tokens", "side_cut", "dropped_tool_outputs", "side_ignored", "kv_reads"):
            setattr(self, name, getattr(self, name) + getattr(usage, name, 0))


def stop_criteria(episode: Episode, tokenizer) -> tuple[list[int], list[str]]:
    """Stop strings that are single tokens become stop token ids (exact, no text matching)."""
    ids, strings = [], []
    for stop in episode.stop_strings:
        tid = tokenizer.token_to_id(stop)
        (ids.append(tid) if tid is not None else strings.append(stop))
    return ids, strings


class EpisodeRunner:
    """Drives episodes on an in-process engine, all concurrently."""

    def __init__(self, engine: Engine, compression: CompressionConfig | None = None, max_turns: int = 32,
                 temperature: float = 0.0, seed: int = 0, oracle: Callable[[int], FutureAttention] | None = None):
        """`oracle(i)` (evaluation only, golden): episode i's oracle, computed when the episode starts and
        dropped when it ends, so at most `max_running` of them are held at once."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.compression = compression or CompressionConfig()
        self.max_turns = max_turns
        self.temperature = temperature
        self.seed = seed
        self.oracle = oracle
        self.oracles: dict[int, FutureAttention] = {}  # episodes in flight -> their oracle

    def run(self, episodes: list[Episode], progress=None) -> list[EpisodeResult]:
        """Run all episodes, at most `max_running` of the engine at a time; `progress(done)` after each step."""
        results = [EpisodeResult(e) for e in episodes]
        queued = list(range(len(episodes)))[::-1]
        while queued or self.engine.has_work():
            in_flight = sum(1 for r in results[:len(episodes) - len(queued)] if not r.finish)
            while queued and in_flight < self.engine.config.max_running:
                i = queued.pop()
                self._submit(i, results[i], self.tokenizer.encode(episodes[i].prompt), first=True)
                in_flight += 1
            self.engine.step()
            if progress is not None:
                progress(sum(1 for r in results if r.finish))
        return results

    def _submit(self, index: int, result: EpisodeResult, input_ids: list[int], first: bool) -> None:
        episode = result.episode
        stop_ids, stop_strings = stop_criteria(episode, self.tokenizer)
        room = self.engine.model_config.max_position_embeddings - result.total_tokens - len(input_ids) - 2
        allowance = episode.generation_limit - result.generated_tokens
        session_id = f"episode-{index}-{id(self)}"
        if first and self.oracle is not None:
            self.oracles[index] = self.oracle(index)
        request = GenerationRequest(
            request_id=f"{session_id}-t{result.turns}",
            input_ids=input_ids,
            sampling=SamplingParams(temperature=self.temperature, seed=self.seed + 1000 * index + result.turns,
                                    max_new_tokens=max(1, min(allowance, room)),
                                    stop_token_ids=stop_ids, stop=stop_strings),
            compression=self.compression,
            session_id=session_id,
            create_session=first,
            input_kind=SegmentKind.USER if first else SegmentKind.TOOL,
            oracle=self.oracles.get(index),
        )
        # Called from inside the engine's callbacks for later turns: queued now, admitted on a later step.
        self.engine.add_request(request, lambda ev: self._on_event(index, result, session_id, ev))

    def _on_event(self, index: int, result: EpisodeResult, session_id: str, event) -> None:
        if isinstance(event, EvictionEvent):
            result.evictions.append(event)
            return
        if not isinstance(event, FinishEvent):
            return
        result.add_turn(event.text, event.usage)
        session = self.engine.store.get(session_id)
        if session is not None:
            result.total_tokens = len(session.token_ids)
            result.token_ids = list(session.token_ids)
            result.segments = [(s.start, s.end, s.kind) for s in session.segments]
        reply = None
        if (event.finish_reason is FinishReason.STOP and result.turns < self.max_turns
                and result.generated_tokens < result.episode.generation_limit):
            # Outputs the model's side threads deleted (SideQuest): a call that would point back at one is
            # answered again with its content, and counted.
            dropped = frozenset(s.index for s in session.segments if s.kind == "tool" and s.dropped) if session else frozenset()
            reply = result.episode.tool_response(event.text, dropped)
            if dropped and reply != result.episode.tool_response(event.text):
                result.reissued += 1
        context = self.engine.model_config.max_position_embeddings
        if reply is not None:
            reply_ids = self.tokenizer.encode(reply)
            if result.total_tokens + len(reply_ids) + 2 < context:
                self._submit(index, result, reply_ids, first=False)
                return
        result.finish = event.finish_reason.value
        result.answered = result.episode.extract_answer(result.text) is not None
        result.correct = result.episode.is_correct(result.text)
        self.oracles.pop(index, None)
        self.engine.delete_session(session_id)


YELLOW, DIM = "33", "2"


def styled(text: str, code: str, out: TextIO) -> str:
    """ANSI colour only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    if os.environ.get("NO_COLOR") or not getattr(out, "isatty", lambda: False)():
        return text
    return f"\033[{code}m{text}\033[0m"


def run_episode_grpc(stub, episode: Episode, tokenizer, out: TextIO = sys.stdout, policy: str = "", budget: int = 0,
                     max_turns: int = 32, interval: int | None = None,
                     window: int | None = None) -> EpisodeResult:
    """One episode over gRPC with streaming output: the model's turns as they stream, tool outputs dimmed."""
    from kvpilot.client import build_request
    from kvpilot_protocol.v1 import decoder_pb2 as pb

    stop_ids, stop_strings = stop_criteria(episode, tokenizer)
    result = EpisodeResult(episode)
    session_id = ""
    text_in, tool = episode.prompt, False
    while True:
        allowance = episode.generation_limit - result.generated_tokens
        request = build_request(text_in, max_new_tokens=allowance, temperature=0.0, stop=stop_strings,
                                stop_token_ids=stop_ids, policy=policy, budget=budget, interval=interval,
                                window=window, session_id=session_id, new_session=not session_id, tool_output=tool)
        complete = None
        for response in stub.Generate(request):
            kind = response.WhichOneof("event")
            if kind == "chunk":
                out.write(response.chunk.text)
                out.flush()
            elif kind == "eviction":
                e = response.eviction
                out.write(" " + styled(f"[evicted {e.evicted}: {e.slots_before}->{e.slots_after} slots]", YELLOW, out))
            else:
                complete = response.complete
        session_id = complete.session_id
        result.add_turn(complete.text, complete.usage)
        reply = episode.tool_response(complete.text) if complete.finish_reason == pb.FINISH_REASON_STOP else None
        if reply is None or result.turns >= max_turns or result.generated_tokens >= episode.generation_limit:
            break
        out.write(f"\n  {styled(reply, DIM, out)}\n")
        text_in, tool = reply, True
    info = stub.GetSession(pb.GetSessionRequest(session_id=session_id))
    result.total_tokens = info.num_tokens
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id))
    result.answered = episode.extract_answer(result.text) is not None
    result.correct = episode.is_correct(result.text)
    result.finish = "done"
    out.write("\n")
    return result


def run_episode_demo(stub, engine: Engine, args, policy: str | None = None, budget: int | None = None,
                     intro: bool = True) -> EpisodeResult:
    """`kvpilot demo` with the bundled model: one multi-hop question, streamed, checked."""
    from kvpilot.tasks import make_episode

    policy = args.policy if policy is None else policy
    budget = args.budget if budget is None else budget
    episode = make_episode(args.task, seed=args.seed)
    if intro:
        print(f"task {episode.task} (seed {episode.seed}, {episode.difficulty}); the model calls a lookup tool, "
              f"reads its output and follows the chain.\n")
        print(f"prompt: {episode.prompt}")
    bound = f"policy {policy}, budget {budget} slots" if policy != "full" else "full cache"
    print(f"--- stream, {bound} (tool outputs dimmed) ---")
    result = run_episode_grpc(stub, episode, engine.tokenizer, policy=policy, budget=budget)
    print("--- result ---")
    verdict = "RIGHT" if result.correct else "WRONG"
    print(f"model answer: {episode.extract_answer(result.text)!r}; expected {episode.answer!r}: {verdict}")
    print(f"turns {result.turns}, sequence {result.total_tokens} tokens ({result.generated_tokens} written by the model), "
          f"peak KV {result.peak_kv_slots} slots ({result.peak_kv_slots * engine.pool.slot_bytes / 1024:.1f} KiB), "
          f"evicted {result.evicted_tokens} in {result.compression_events} compressions")
    return result
