"""Comparison state in Redis, read and written by the gateway and the workers.

Layout (``P`` is the key prefix):
  P:cmp:{id}                 hash: spec (JSON, without rows), status, timestamps, MLflow ids
  P:cmp:{id}:rows            JSON list of dataset rows
  P:cmp:{id}:cand:{label}    hash: status, done, total, metrics (JSON), run_id, error, timestamps
  P:cmp:{id}:out:{label}     JSON list of {"output", "scores"} per row, written when a candidate ends
  P:cmp:{id}:ended           set of labels whose task has ended (any final state)
  P:cmp:{id}:tasks           hash label -> Celery task id (for revoke on cancel)
  P:cmp:{id}:votes           list of JSON pairwise votes, oldest first
  P:cmp:{id}:ratings         hash JSON [row, label, rater] -> JSON rating of one output cell
  P:cmp:{id}:matchup:{mid}   hash: data (JSON row, a, b, voter), used (set by the vote); a day's TTL
  P:cmp:{id}:feedback_log    flag: logging votes and ratings to MLflow is already queued
  P:cmps                     sorted set id -> created_at (newest-first listing)

Every status change goes through a compare-and-set script so that, for example, a worker that
starts late never turns a cancelled comparison back into a running one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import redis

from shared.schemas import (
    FINAL_CANDIDATE_STATES,
    FINAL_COMPARISON_STATUSES,
    CandidateState,
    ComparisonCreate,
    ComparisonStatus,
)

# KEYS[1] hash, ARGV[1] field, ARGV[2] new value, ARGV[3..] allowed current values.
_CAS_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
for i = 3, #ARGV do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    return 1
  end
end
return 0
"""

# KEYS[1] matchup hash, ARGV[1] when it was used. Returns nil for an unknown or expired matchup,
# else {data, 1 if this call is the first to use it}.
_TAKE_MATCHUP_SCRIPT = """
local data = redis.call('HGET', KEYS[1], 'data')
if not data then return nil end
return {data, redis.call('HSETNX', KEYS[1], 'used', ARGV[1])}
"""

MATCHUP_TTL_S = 24 * 3600
# Long enough for a queued log task to run; short enough that a lost one blocks nothing for long.
FEEDBACK_LOG_FLAG_TTL_S = 600


def utcnow() -> str:
    return datetime.now(UTC).isoformat()


class ComparisonNotFound(KeyError):
    pass


class ComparisonStore:
    def __init__(self, client: redis.Redis, *, prefix: str = "llmc", ttl_s: int | None = None):
        # Created with decode_responses=True: every reply is str, which redis-py's stubs cannot express.
        self.r: Any = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._cas = self.r.register_script(_CAS_SCRIPT)
        self._take_matchup = self.r.register_script(_TAKE_MATCHUP_SCRIPT)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "llmc", ttl_s: int | None = None) -> ComparisonStore:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=2, health_check_interval=30
        )
        return cls(client, prefix=prefix, ttl_s=ttl_s)

    # ---- keys
    def _key(self, comparison_id: str, *parts: str) -> str:
        # ":" separates key parts: an id holding one would name another key (a candidate's hash
        # read as a comparison), so no such comparison exists.
        if ":" in comparison_id:
            raise ComparisonNotFound(comparison_id)
        return ":".join((self.prefix, "cmp", comparison_id, *parts))

    @property
    def _index(self) -> str:
        return f"{self.prefix}:cmps"

    # ---- creation
    def create(
        self, *, comparison_id: str, spec: ComparisonCreate, experiment: str, metrics: list[str]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Store a new comparison in one round trip; return it as get() and candidates() would."""
        now = utcnow()
        stored_spec = spec.model_dump(mode="json", exclude={"dataset"})
        stored_spec["experiment"] = experiment
        stored_spec["metrics"] = metrics
        rows = spec.dataset.rows
        record = {
            "id": comparison_id,
            "spec": json.dumps(stored_spec),
            "status": ComparisonStatus.queued.value,
            "created_at": now,
            "rows": len(rows),
        }
        candidates = [
            {
                "label": candidate.label,
                "model": candidate.model,
                "status": CandidateState.queued.value,
                "done": 0,
                "total": len(rows),
            }
            for candidate in spec.candidates
        ]
        written = [self._key(comparison_id), self._key(comparison_id, "rows")]
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._key(comparison_id), mapping=record)
        pipe.set(self._key(comparison_id, "rows"), json.dumps(rows))
        for candidate_record in candidates:
            key = self._key(comparison_id, "cand", str(candidate_record["label"]))
            pipe.hset(key, mapping=candidate_record)
            written.append(key)
        pipe.zadd(self._index, {comparison_id: datetime.now(UTC).timestamp()})
        if self.ttl_s:
            # Keys written later (outputs, task ids, the ended set) get their expiry when written.
            for key in written:
                pipe.expire(key, self.ttl_s)
        pipe.execute()
        record_read = {**record, "spec": stored_spec, "pairwise": [], "judge_ranking": None}
        return record_read, [_decode_candidate({k: str(v) for k, v in c.items()}) for c in candidates]

    # ---- reads
    def exists(self, comparison_id: str) -> bool:
        try:
            return bool(self.r.exists(self._key(comparison_id)))
        except ComparisonNotFound:
            return False

    def get(self, comparison_id: str) -> dict[str, Any]:
        data = self.r.hgetall(self._key(comparison_id))
        if not data:
            raise ComparisonNotFound(comparison_id)
        data["spec"] = json.loads(data["spec"])
        data["pairwise"] = json.loads(data["pairwise"]) if data.get("pairwise") else []
        data["judge_ranking"] = json.loads(data["judge_ranking"]) if data.get("judge_ranking") else None
        data["rows"] = int(data.get("rows", 0))
        return data

    def spec(self, comparison_id: str) -> dict[str, Any]:
        raw = self.r.hget(self._key(comparison_id), "spec")
        if raw is None:
            raise ComparisonNotFound(comparison_id)
        return json.loads(raw)

    def status(self, comparison_id: str) -> ComparisonStatus:
        raw = self.r.hget(self._key(comparison_id), "status")
        if raw is None:
            raise ComparisonNotFound(comparison_id)
        return ComparisonStatus(raw)

    def rows(self, comparison_id: str) -> list[dict[str, Any]]:
        raw = self.r.get(self._key(comparison_id, "rows"))
        if raw is None:
            raise ComparisonNotFound(comparison_id)
        return json.loads(raw)

    def candidate(self, comparison_id: str, label: str) -> dict[str, Any]:
        data = self.r.hgetall(self._key(comparison_id, "cand", label))
        if not data:
            raise ComparisonNotFound(f"{comparison_id}/{label}")
        return _decode_candidate(data)

    def candidates(self, comparison_id: str, labels: list[str]) -> list[dict[str, Any]]:
        pipe = self.r.pipeline(transaction=False)
        for label in labels:
            pipe.hgetall(self._key(comparison_id, "cand", label))
        return [_decode_candidate(data) for data in pipe.execute() if data]

    def outputs(self, comparison_id: str, label: str) -> list[dict[str, Any]] | None:
        raw = self.r.get(self._key(comparison_id, "out", label))
        return json.loads(raw) if raw is not None else None

    def list_ids(self, *, status: ComparisonStatus | None, limit: int, offset: int) -> tuple[list[str], int]:
        if status is None:
            total = self.r.zcard(self._index)
            ids = self.r.zrevrange(self._index, offset, offset + limit - 1)
            return list(ids), int(total)
        # Filtering by status scans the index; comparisons are few (thousands), so one pipelined
        # pass is cheaper than keeping a second index consistent across workers.
        all_ids = self.r.zrevrange(self._index, 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for cid in all_ids:
            pipe.hget(self._key(cid), "status")
        matching = [cid for cid, st in zip(all_ids, pipe.execute(), strict=True) if st == status.value]
        return matching[offset : offset + limit], len(matching)

    def task_ids(self, comparison_id: str) -> dict[str, str]:
        return self.r.hgetall(self._key(comparison_id, "tasks"))

    # ---- comparison-level writes
    def set_fields(self, comparison_id: str, **fields: Any) -> None:
        self.r.hset(self._key(comparison_id), mapping={k: str(v) for k, v in fields.items() if v is not None})

    def record_task(self, comparison_id: str, label: str, task_id: str) -> None:
        self.r.hset(self._key(comparison_id, "tasks"), label, task_id)
        if self.ttl_s:
            self.r.expire(self._key(comparison_id, "tasks"), self.ttl_s)

    def transition(
        self, comparison_id: str, new: ComparisonStatus, *, allowed_from: Iterable[ComparisonStatus]
    ) -> bool:
        ok = self._cas(
            keys=[self._key(comparison_id)],
            args=["status", new.value, *(s.value for s in allowed_from)],
        )
        if ok and new.is_final:
            self.set_fields(comparison_id, finished_at=utcnow())
        return bool(ok)

    # ---- candidate-level writes
    def transition_candidate(
        self,
        comparison_id: str,
        label: str,
        new: CandidateState,
        *,
        allowed_from: Iterable[CandidateState],
        **fields: Any,
    ) -> bool:
        key = self._key(comparison_id, "cand", label)
        ok = bool(self._cas(keys=[key], args=["status", new.value, *(s.value for s in allowed_from)]))
        if ok:
            extra = {k: v for k, v in fields.items() if v is not None}
            if new is CandidateState.running:
                extra.setdefault("started_at", utcnow())
            if new in FINAL_CANDIDATE_STATES:
                extra.setdefault("finished_at", utcnow())
            if extra:
                self.r.hset(key, mapping={k: _encode(v) for k, v in extra.items()})
        return ok

    def set_candidate_fields(self, comparison_id: str, label: str, **fields: Any) -> None:
        self.r.hset(
            self._key(comparison_id, "cand", label),
            mapping={k: _encode(v) for k, v in fields.items() if v is not None},
        )

    def set_progress(
        self,
        comparison_id: str,
        label: str,
        *,
        done: int,
        total: int,
        tokens_per_second: float | None = None,
        eta_s: float | None = None,
    ) -> None:
        mapping: dict[str, Any] = {"done": done, "total": total}
        if tokens_per_second is not None:
            mapping["tokens_per_second"] = round(tokens_per_second, 2)
        if eta_s is not None:
            mapping["eta_s"] = round(eta_s, 1)
        self.r.hset(self._key(comparison_id, "cand", label), mapping=mapping)

    def save_outputs(self, comparison_id: str, label: str, outputs: list[dict[str, Any]]) -> None:
        self.r.set(self._key(comparison_id, "out", label), json.dumps(outputs), ex=self.ttl_s)

    def mark_ended(self, comparison_id: str, label: str) -> tuple[bool, int]:
        """Record that a candidate's task ended. Returns (newly ended, how many have ended)."""
        key = self._key(comparison_id, "ended")
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(key, label)
        pipe.scard(key)
        if self.ttl_s:
            pipe.expire(key, self.ttl_s)
        added, count, *_ = pipe.execute()
        return bool(added), int(count)

    # ---- human evaluation
    def add_vote(self, comparison_id: str, vote: dict[str, Any]) -> int:
        """Append a vote; returns how many votes the comparison has now."""
        key = self._key(comparison_id, "votes")
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(key, json.dumps(vote))
        if self.ttl_s:
            pipe.expire(key, self.ttl_s)
        count, *_ = pipe.execute()
        return int(count)

    def votes(self, comparison_id: str) -> list[dict[str, Any]]:
        # One parse of the whole list: at thousands of votes, half the time of one parse per vote.
        return json.loads("[" + ",".join(self.r.lrange(self._key(comparison_id, "votes"), 0, -1)) + "]")

    def set_rating(self, comparison_id: str, rating: dict[str, Any]) -> None:
        """Store one rater's rating of one output cell (row, label), replacing their earlier one.
        An entry with neither a rating nor a comment removes it."""
        key = self._key(comparison_id, "ratings")
        field = json.dumps([rating["row"], rating["label"], rating.get("rater")])
        if rating.get("rating") is None and not rating.get("comment"):
            self.r.hdel(key, field)
            return
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, field, json.dumps(rating))
        if self.ttl_s:
            pipe.expire(key, self.ttl_s)
        pipe.execute()

    def ratings(self, comparison_id: str) -> list[dict[str, Any]]:
        """Every rating, ordered by row, then label, then rater."""
        entries = [json.loads(raw) for raw in self.r.hvals(self._key(comparison_id, "ratings"))]
        return sorted(entries, key=lambda e: (e["row"], e["label"], e.get("rater") or ""))

    def save_matchup(
        self, comparison_id: str, matchup_id: str, matchup: dict[str, Any], *, ttl_s: int = MATCHUP_TTL_S
    ) -> None:
        key = self._key(comparison_id, "matchup", matchup_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, "data", json.dumps(matchup))
        pipe.expire(key, ttl_s)
        pipe.execute()

    def take_matchup(self, comparison_id: str, matchup_id: str) -> tuple[dict[str, Any], bool] | None:
        """Read a matchup and mark it used, atomically, so that one matchup yields one vote.

        Returns None when it is unknown or expired, else (matchup, True for the first taker only).
        """
        taken = self._take_matchup(keys=[self._key(comparison_id, "matchup", matchup_id)], args=[utcnow()])
        if taken is None:
            return None
        data, first = taken
        return json.loads(data), bool(int(first))

    def claim_feedback_log(self, comparison_id: str) -> bool:
        """True when no MLflow logging of votes and ratings is queued yet (the caller queues it)."""
        key = self._key(comparison_id, "feedback_log")
        return bool(self.r.set(key, "1", nx=True, ex=FEEDBACK_LOG_FLAG_TTL_S))

    def release_feedback_log(self, comparison_id: str) -> None:
        """Called by the log task before it reads, so a vote arriving meanwhile queues another."""
        self.r.delete(self._key(comparison_id, "feedback_log"))

    def ping(self) -> bool:
        return bool(self.r.ping())


def _encode(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _decode_candidate(data: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(data)
    out["done"] = int(data.get("done", 0))
    out["total"] = int(data.get("total", 0))
    out["tokens_per_second"] = float(data["tokens_per_second"]) if data.get("tokens_per_second") else None
    out["eta_s"] = float(data["eta_s"]) if data.get("eta_s") else None
    out["cache_hits"] = int(data.get("cache_hits", 0))
    out["metrics"] = json.loads(data["metrics"]) if data.get("metrics") else {}
    out["aggregates"] = json.loads(data["aggregates"]) if data.get("aggregates") else {}
    return out


__all__ = [
    "FINAL_COMPARISON_STATUSES",
    "ComparisonNotFound",
    "ComparisonStore",
    "utcnow",
]
