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
  P:cmp:{id}:audit           stream of who did what (submitted, cancelled, voted, rated)
  P:cmps                     sorted set id -> created_at (newest-first listing)
  P:owner:{owner}:cmps       the same, for one owner (an API key's name)
  P:active:{key_id}          set of comparison ids a key submitted that may not have ended
  P:apikey:{key_id}          hash: name, role, key_hash (SHA-256), created/revoked/last used, quotas
  P:apikeys                  set of key ids
  P:rate:{bucket}            theoretical arrival time of a rate limit (GCRA)
  P:idem:{key_id}:{sha256}   the comparison an Idempotency-Key made, for a day
  P:lease:{id}:{step}        token of the process running a step (a label, @start, @finalize)
  P:cmp:{id}:expect:{step}   id of a task just queued for a step (expires when it should have run)
  P:cmp:{id}:unended         hash label -> starts of the candidate that did not end (worker deaths)
  P:cmp:{id}:requeues        hash step -> times the sweep queued a lost step again
  P:cmp:{id}:suspect         hash step -> when the sweep first saw nothing running it
  P:cmp:{id}:finalize_claim  flag: the summary step is queued (set by the last candidate to end)
  P:open                     sorted set id -> started at, until its summary step has run
  P:sweep                    flag: one worker's reconciler sweeps at a time
  P:gen:{sha256}             JSON of one generated output (the response cache), RESULT_TTL_S
  P:cmp:{id}:remote:{label}  JSON of an endpoint candidate's generated rows, for its scoring step
  P:endpoint:{name}:slots    sorted set token -> expiry: requests in flight to a remote endpoint
  P:endpoint:{name}:limit    hash: limit (adaptive concurrency), cut_at (last halving)
  P:metrics:custom           hash name -> JSON description of a custom metric workers published
  P:cmp:{id}:callbacks       JSON {"key_id", "callbacks": [{"url", "events"}]}: whom to call back
  P:cmp:{id}:deliveries      hash webhook id -> JSON delivery: event, url, body, state, attempts
  P:webhooks:due             sorted set "{id}/{webhook id}" -> when its next attempt is due
  P:whlock:{webhook id}      token of the I/O worker making an attempt of that delivery
  P:whsecret:{key_id}        hash: secret, created_at, previous, previous_expires_at (signing)

Every status change goes through a compare-and-set script so that, for example, a worker that
starts late never turns a cancelled comparison back into a running one.

A comparison and its candidates read back as the typed records of shared/records.py, decoded
here only (see "decoding" at the end).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import redis

from shared.apikeys import KeyRecord, Quotas, Role
from shared.records import CandidateRecord, ComparisonRecord, ComparisonSpec
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

# KEYS[1] bucket; ARGV[1] seconds between requests at the steady rate, ARGV[2] the burst window.
# The bucket holds the theoretical arrival time (TAT) of the next request, in server time.
_GCRA_SCRIPT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat + interval - window
if allow_at > now then return tostring(allow_at - now) end
redis.call('SET', KEYS[1], tostring(tat + interval), 'EX', math.ceil(window * 2))
return '0'
"""

# KEYS[1] idempotency key; ARGV[1] body hash, ARGV[2] ttl. Values: "pending|hash" or
# "done|hash|comparison_id". Returns {state, comparison_id}.
_IDEMPOTENCY_SCRIPT = """
local stored = redis.call('GET', KEYS[1])
if not stored then
  redis.call('SET', KEYS[1], 'pending|' .. ARGV[1], 'EX', tonumber(ARGV[2]))
  return {'new', ''}
end
local state, hash, id = string.match(stored, '^(%a+)|([^|]*)|?(.*)$')
if hash ~= ARGV[1] then return {'conflict', ''} end
return {state, id or ''}
"""

# Fenced writes: KEYS[1] is a lease, ARGV[1] the writer's token; the write happens only while
# the writer holds the lease, in the same round trip as the check.
# KEYS[2] hash; ARGV[2..] field, value pairs.
_FENCED_HSET_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 1
"""
# KEYS[2] string; ARGV[2] value, ARGV[3] seconds to live (0: none).
_FENCED_SET_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', tonumber(ARGV[3]))
else
  redis.call('SET', KEYS[2], ARGV[2])
end
return 1
"""
# KEYS[2] candidate hash; ARGV[2] new status, ARGV[3] n, ARGV[4..3+n] allowed current statuses,
# then field, value pairs written with it. Returns -1 (lease not held), 0 (refused) or 1.
_FENCED_CAS_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local current = redis.call('HGET', KEYS[2], 'status')
if not current then return 0 end
local n = tonumber(ARGV[3])
for i = 4, 3 + n do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[2], 'status', ARGV[2])
    if #ARGV > 3 + n then redis.call('HSET', KEYS[2], unpack(ARGV, 4 + n)) end
    return 1
  end
end
return 0
"""
# A semaphore of expiring holders: a request to a remote endpoint holds a slot until it releases
# it or its expiry passes (its worker died), so a dead worker's slots come back by themselves.
# KEYS[1] holders (token -> expiry), KEYS[2] the adaptive limit; ARGV[1] token, ARGV[2] the
# endpoint's max_concurrency, ARGV[3] seconds the slot is held at most. Returns 1 when acquired.
_ENDPOINT_ACQUIRE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ceiling = tonumber(ARGV[2])
local limit = tonumber(redis.call('HGET', KEYS[2], 'limit') or ARGV[2])
limit = math.max(1, math.min(ceiling, math.floor(limit)))
if redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 1)
return 1
"""
# Adaptive concurrency, additive increase / multiplicative decrease: a 429 halves the limit (once
# per cooldown, so a burst of 429s from requests already in flight counts once), each success
# adds 1/limit (one slot back per limit-many successes), up to max_concurrency.
# KEYS[1] the limit hash; ARGV[1] max_concurrency, ARGV[2] 'cut' or 'grow', ARGV[3] cooldown
# seconds, ARGV[4] seconds the state is kept after its last change. Returns the limit.
_ENDPOINT_ADAPT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ceiling = tonumber(ARGV[1])
local limit = tonumber(redis.call('HGET', KEYS[1], 'limit') or ARGV[1])
if limit > ceiling then limit = ceiling end
if ARGV[2] == 'cut' then
  local last = tonumber(redis.call('HGET', KEYS[1], 'cut_at') or '0')
  if now - last < tonumber(ARGV[3]) then return tostring(limit) end
  limit = math.max(1, math.floor(limit / 2))
  redis.call('HSET', KEYS[1], 'cut_at', tostring(now))
else
  if limit >= ceiling then return tostring(limit) end
  limit = math.min(ceiling, limit + 1 / limit)
end
redis.call('HSET', KEYS[1], 'limit', tostring(limit))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return tostring(limit)
"""
# KEYS[1] hash, ARGV[1] field: decrement, never below 0.
_DECREMENT_FLOOR_SCRIPT = """
local value = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if value > 0 then return redis.call('HINCRBY', KEYS[1], ARGV[1], -1) end
return 0
"""

MATCHUP_TTL_S = 24 * 3600
IDEMPOTENCY_TTL_S = 24 * 3600
AUDIT_MAX_ENTRIES = 10_000
# Whose comparisons are those submitted with auth off (and those stored before owners existed).
LOCAL_OWNER = "local"
# Long enough for a queued log task to run; short enough that a lost one blocks nothing for long.
FEEDBACK_LOG_FLAG_TTL_S = 600
# A 429 halves an endpoint's adaptive limit at most once this often; an endpoint left alone this
# long starts again at its max_concurrency.
ENDPOINT_CUT_COOLDOWN_S = 1.0
ENDPOINT_LIMIT_TTL_S = 600


def utcnow() -> str:
    return datetime.now(UTC).isoformat()


class ComparisonNotFound(KeyError):
    pass


class LeaseLost(Exception):
    """A fenced write was refused: the writer no longer holds the step's lease."""


# Steps of a comparison besides its candidates (whose steps are their labels).
START_STEP = "@start"
FINALIZE_STEP = "@finalize"


class ComparisonStore:
    def __init__(self, client: redis.Redis, *, prefix: str = "llmc", ttl_s: int | None = None):
        # Created with decode_responses=True: every reply is str, which redis-py's stubs cannot express.
        self.r: Any = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._cas = self.r.register_script(_CAS_SCRIPT)
        self._gcra = self.r.register_script(_GCRA_SCRIPT)
        self._claim_idempotency = self.r.register_script(_IDEMPOTENCY_SCRIPT)
        self._take_matchup = self.r.register_script(_TAKE_MATCHUP_SCRIPT)
        self._fenced_hset = self.r.register_script(_FENCED_HSET_SCRIPT)
        self._fenced_set = self.r.register_script(_FENCED_SET_SCRIPT)
        self._fenced_cas = self.r.register_script(_FENCED_CAS_SCRIPT)
        self._decrement_floor = self.r.register_script(_DECREMENT_FLOOR_SCRIPT)
        self._endpoint_acquire = self.r.register_script(_ENDPOINT_ACQUIRE_SCRIPT)
        self._endpoint_adapt = self.r.register_script(_ENDPOINT_ADAPT_SCRIPT)

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
        self,
        *,
        comparison_id: str,
        spec: ComparisonCreate,
        experiment: str,
        metrics: list[str],
        owner: str = LOCAL_OWNER,
        key_id: str | None = None,
    ) -> tuple[ComparisonRecord, list[CandidateRecord]]:
        """Store a new comparison in one round trip; return it as get() and candidates() would.

        ``owner`` is the name of the API key that submitted it (its team); ``key_id`` counts it
        against that key's running-comparisons quota until it ends."""
        now = utcnow()
        # Callbacks are kept apart: their URLs are not part of what runs, nor of what reaches MLflow.
        stored_spec = spec.model_dump(mode="json", exclude={"dataset", "callbacks"})
        stored_spec["experiment"] = experiment
        stored_spec["metrics"] = metrics
        rows = spec.dataset.rows
        record = {
            "id": comparison_id,
            "spec": json.dumps(stored_spec),
            "status": ComparisonStatus.queued.value,
            "created_at": now,
            "rows": len(rows),
            "owner": owner,
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
        if spec.callbacks:
            # The key that submitted it signs its deliveries (its webhook secret).
            callbacks = {
                "key_id": key_id or LOCAL_OWNER,
                "callbacks": [c.model_dump(mode="json") for c in spec.callbacks],
            }
            pipe.set(self._key(comparison_id, "callbacks"), json.dumps(callbacks))
            written.append(self._key(comparison_id, "callbacks"))
        created = datetime.now(UTC).timestamp()
        pipe.zadd(self._index, {comparison_id: created})
        pipe.zadd(self._owner_index(owner), {comparison_id: created})
        if key_id is not None:
            pipe.sadd(self._active_key(key_id), comparison_id)
        if self.ttl_s:
            # Keys written later (outputs, task ids, the ended set) get their expiry when written.
            for key in written:
                pipe.expire(key, self.ttl_s)
        pipe.execute()
        # Decoded from what was written, so that it reads exactly as get() and candidates() will.
        return _decode_comparison({k: str(v) for k, v in record.items()}), [
            _decode_candidate({k: str(v) for k, v in c.items()}) for c in candidates
        ]

    # ---- reads
    def exists(self, comparison_id: str) -> bool:
        try:
            return bool(self.r.exists(self._key(comparison_id)))
        except ComparisonNotFound:
            return False

    def get(self, comparison_id: str) -> ComparisonRecord:
        data = self.r.hgetall(self._key(comparison_id))
        if not data:
            raise ComparisonNotFound(comparison_id)
        return _decode_comparison(data)

    def spec(self, comparison_id: str) -> ComparisonSpec:
        raw = self.r.hget(self._key(comparison_id), "spec")
        if raw is None:
            raise ComparisonNotFound(comparison_id)
        return ComparisonSpec.model_validate_json(raw)

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

    def candidate(self, comparison_id: str, label: str) -> CandidateRecord:
        data = self.r.hgetall(self._key(comparison_id, "cand", label))
        if not data:
            raise ComparisonNotFound(f"{comparison_id}/{label}")
        return _decode_candidate(data)

    def candidates(self, comparison_id: str, labels: list[str]) -> list[CandidateRecord]:
        pipe = self.r.pipeline(transaction=False)
        for label in labels:
            pipe.hgetall(self._key(comparison_id, "cand", label))
        return [_decode_candidate(data) for data in pipe.execute() if data]

    def many(self, comparison_ids: list[str]) -> list[tuple[ComparisonRecord, list[CandidateRecord]]]:
        """Records with their candidates for a page of ids in two round trips, however long the
        page; ids whose record has expired meanwhile are left out."""
        pipe = self.r.pipeline(transaction=False)
        for comparison_id in comparison_ids:
            pipe.hgetall(self._key(comparison_id))
        records = [_decode_comparison(data) for data in pipe.execute() if data]
        pipe = self.r.pipeline(transaction=False)
        for record in records:
            for label in record.labels:
                pipe.hgetall(self._key(record.id, "cand", label))
        found = iter(pipe.execute())
        return [
            (record, [_decode_candidate(data) for data in [next(found) for _ in record.labels] if data])
            for record in records
        ]

    def outputs(self, comparison_id: str, label: str) -> list[dict[str, Any]] | None:
        raw = self.r.get(self._key(comparison_id, "out", label))
        return json.loads(raw) if raw is not None else None

    def list_ids(self, *, status: ComparisonStatus | None, limit: int, offset: int) -> tuple[list[str], int]:
        return self._list_index(self._index, status=status, limit=limit, offset=offset)

    def _list_index(
        self, index: str, *, status: ComparisonStatus | None, limit: int, offset: int
    ) -> tuple[list[str], int]:
        if status is not None:
            # Filtering by status scans the index (pruning it, see "index upkeep"); comparisons
            # are few (thousands within RESULT_TTL_S), so one pipelined pass is cheaper than
            # keeping an index per status consistent across workers.
            live = self.live_index_entries(index)
            matching = [cid for cid, st in live if st == status.value]
            return matching[offset : offset + limit], len(matching)
        # Unfiltered, which the pages poll every few seconds: records expire RESULT_TTL_S after
        # creation, so trimming by score drops exactly the expired ones and ZCARD is the total;
        # only the page itself is checked for records gone some other way.
        self._trim_expired(index)
        while True:
            page = self.r.zrevrange(index, offset, offset + limit - 1)
            gone = [cid for cid, st in self._statuses(page) if st is None]
            if not gone:
                return list(page), int(self.r.zcard(index))
            self.r.zrem(index, *gone)

    def task_ids(self, comparison_id: str) -> dict[str, str]:
        return self.r.hgetall(self._key(comparison_id, "tasks"))

    # ---- index upkeep: listing indexes outlive the records they point to
    # A record expires RESULT_TTL_S after it was created; its entry in a sorted set does not,
    # so without pruning the index grows forever and totals count comparisons long gone.
    def _trim_expired(self, index: str) -> None:
        if self.ttl_s:
            cutoff = datetime.now(UTC).timestamp() - self.ttl_s
            self.r.zremrangebyscore(index, "-inf", f"({cutoff}")

    def _statuses(self, ids: list[str]) -> list[tuple[str, str | None]]:
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for cid in ids:
            # Ids are uuid hex; a member holding ":" names no comparison (see _key).
            pipe.hget(f"{self.prefix}:cmp:{cid}" if ":" not in cid else f"{self.prefix}:cmp:-", "status")
        return list(zip(ids, pipe.execute(), strict=True))

    def live_index_entries(self, index: str) -> list[tuple[str, str]]:
        """(id, status) of the comparisons ``index`` lists whose record still exists, newest
        first. Entries older than the TTL, and those whose record is gone (expired, deleted or
        evicted), are removed from the index on the way."""
        self._trim_expired(index)
        entries = self._statuses(self.r.zrevrange(index, 0, -1))
        gone = [cid for cid, st in entries if st is None]
        if gone:
            self.r.zrem(index, *gone)
        return [(cid, st) for cid, st in entries if st is not None]

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

    # ---- access: API keys, ownership, quotas, idempotency, audit
    # Keys, owner indexes and rate buckets belong to people and keys, not to one comparison:
    # they carry no comparison TTL (a key lives until it is revoked).
    def _owner_index(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:cmps"

    def _active_key(self, key_id: str) -> str:
        return f"{self.prefix}:active:{key_id}"

    def _api_key(self, key_id: str) -> str:
        return f"{self.prefix}:apikey:{key_id}"

    @property
    def _api_keys(self) -> str:
        return f"{self.prefix}:apikeys"

    def owner(self, comparison_id: str) -> str:
        raw = self.r.hget(self._key(comparison_id), "owner")
        if raw is None and not self.exists(comparison_id):
            raise ComparisonNotFound(comparison_id)
        # Comparisons stored before owners existed belong to the local owner.
        return raw or LOCAL_OWNER

    def list_owned_ids(
        self, *, owner: str, status: ComparisonStatus | None, limit: int, offset: int
    ) -> tuple[list[str], int]:
        """Like list_ids, over one owner's comparisons, newest first."""
        return self._list_index(self._owner_index(owner), status=status, limit=limit, offset=offset)

    def save_api_key(self, record: KeyRecord) -> None:
        fields = {
            "id": record.id,
            "name": record.name,
            "role": record.role.value,
            "key_hash": record.key_hash,
            "created_at": record.created_at,
            "quotas": json.dumps(asdict(record.quotas)),
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._api_key(record.id), mapping=fields)
        pipe.sadd(self._api_keys, record.id)
        pipe.execute()

    def api_key(self, key_id: str) -> KeyRecord | None:
        data = self.r.hgetall(self._api_key(key_id))
        if not data:
            return None
        return KeyRecord(
            id=data["id"],
            name=data["name"],
            role=Role(data["role"]),
            key_hash=data["key_hash"],
            created_at=data["created_at"],
            revoked_at=data.get("revoked_at") or None,
            last_used_at=data.get("last_used_at") or None,
            quotas=Quotas(**json.loads(data.get("quotas") or "{}")),
        )

    def api_keys(self) -> list[KeyRecord]:
        records = [self.api_key(key_id) for key_id in sorted(self.r.smembers(self._api_keys))]
        return sorted((r for r in records if r is not None), key=lambda r: (r.name, r.created_at))

    def revoke_api_key(self, key_id: str) -> bool:
        """Revoke a key; False when there is no such key or it was already revoked."""
        key = self._api_key(key_id)
        if not self.r.exists(key):
            return False
        return bool(self.r.hsetnx(key, "revoked_at", utcnow()))

    def touch_api_key(self, key_id: str) -> None:
        """Record when a key was last used, at most once a minute (not a write per request)."""
        if self.r.set(f"{self._api_key(key_id)}:touched", "1", nx=True, ex=60):
            self.r.hset(self._api_key(key_id), "last_used_at", utcnow())

    def take_rate_token(self, bucket: str, *, per_minute: int) -> float:
        """Generic cell-rate algorithm: up to ``per_minute`` requests in any minute, a burst of
        that size allowed after a quiet minute. Returns 0 when this request may go ahead, else
        the seconds until it would (for Retry-After). One script, so API processes share it."""
        retry_after = self._gcra(keys=[f"{self.prefix}:rate:{bucket}"], args=[60.0 / per_minute, 60.0])
        return float(retry_after)

    def running_count(self, key_id: str, *, limit: int | None = None) -> int:
        """Comparisons this key submitted that have not ended; ended ones leave the set here.

        With ``limit``, a set smaller than it is answered from its size alone (one round trip):
        pruning, which reads every member's status, only runs when the limit may be reached."""
        key = self._active_key(key_id)
        if limit is not None:
            size = int(self.r.scard(key))
            if size < limit:
                return size
        ids = list(self.r.smembers(key))
        if not ids:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for cid in ids:
            pipe.hget(self._key(cid), "status")
        ended = [
            cid
            for cid, status in zip(ids, pipe.execute(), strict=True)
            if status is None or ComparisonStatus(status).is_final
        ]
        if ended:
            self.r.srem(key, *ended)
        return len(ids) - len(ended)

    def claim_idempotency_key(self, key_id: str, idempotency_key: str, body_hash: str) -> tuple[str, str]:
        """Reserve (key, Idempotency-Key) for this body. Returns ("new", "") for the first
        request, else what is stored: ("done", comparison_id), ("pending", "") while the first
        is still being submitted, or ("conflict", "") for the same key with another body."""
        name = hashlib.sha256(idempotency_key.encode()).hexdigest()
        state, stored_id = self._claim_idempotency(
            keys=[f"{self.prefix}:idem:{key_id}:{name}"], args=[body_hash, IDEMPOTENCY_TTL_S]
        )
        return str(state), str(stored_id)

    def finish_idempotency_key(
        self, key_id: str, idempotency_key: str, body_hash: str, comparison_id: str
    ) -> None:
        name = hashlib.sha256(idempotency_key.encode()).hexdigest()
        self.r.set(
            f"{self.prefix}:idem:{key_id}:{name}", f"done|{body_hash}|{comparison_id}", ex=IDEMPOTENCY_TTL_S
        )

    def drop_idempotency_key(self, key_id: str, idempotency_key: str) -> None:
        """Forget a reservation whose submission was refused, so a corrected request may reuse it."""
        name = hashlib.sha256(idempotency_key.encode()).hexdigest()
        self.r.delete(f"{self.prefix}:idem:{key_id}:{name}")

    def audit(self, comparison_id: str, *, actor: str, action: str, **details: Any) -> None:
        """Append who did what to the comparison's audit stream (capped, expiring with it)."""
        key = self._key(comparison_id, "audit")
        entry = {"at": utcnow(), "actor": actor, "action": action}
        entry.update({k: _encode(v) for k, v in details.items() if v is not None})
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(key, entry, maxlen=AUDIT_MAX_ENTRIES, approximate=True)
        if self.ttl_s:
            pipe.expire(key, self.ttl_s)
        pipe.execute()

    def audit_log(self, comparison_id: str) -> list[dict[str, str]]:
        entries = self.r.xrange(self._key(comparison_id, "audit"))
        return [{"id": entry_id, **fields} for entry_id, fields in entries]

    # ---- delivery: leases, fenced writes, expected tasks, attempts (the workers and their sweep)
    # A step is a candidate's label, START_STEP or FINALIZE_STEP (labels cannot start with "@").
    def lease_key(self, comparison_id: str, step: str) -> str:
        self._key(comparison_id)  # refuses an id holding ":"
        return f"{self.prefix}:lease:{comparison_id}:{step}"

    def fenced_set_candidate_fields(
        self, comparison_id: str, label: str, *, lease_key: str, token: str, **fields: Any
    ) -> None:
        """set_candidate_fields, only while ``token`` holds the lease (checked in the same script)."""
        mapping = [part for k, v in fields.items() if v is not None for part in (k, _encode(v))]
        if not mapping:
            return
        held = self._fenced_hset(
            keys=[lease_key, self._key(comparison_id, "cand", label)], args=[token, *mapping]
        )
        if not held:
            raise LeaseLost(lease_key)

    def fenced_set_progress(
        self,
        comparison_id: str,
        label: str,
        *,
        lease_key: str,
        token: str,
        done: int,
        total: int,
        tokens_per_second: float | None = None,
        eta_s: float | None = None,
    ) -> None:
        self.fenced_set_candidate_fields(
            comparison_id,
            label,
            lease_key=lease_key,
            token=token,
            done=done,
            total=total,
            tokens_per_second=None if tokens_per_second is None else round(tokens_per_second, 2),
            eta_s=None if eta_s is None else round(eta_s, 1),
        )

    def fenced_save_outputs(
        self, comparison_id: str, label: str, outputs: list[dict[str, Any]], *, lease_key: str, token: str
    ) -> None:
        held = self._fenced_set(
            keys=[lease_key, self._key(comparison_id, "out", label)],
            args=[token, json.dumps(outputs), self.ttl_s or 0],
        )
        if not held:
            raise LeaseLost(lease_key)

    def fenced_transition_candidate(
        self,
        comparison_id: str,
        label: str,
        new: CandidateState,
        *,
        allowed_from: Iterable[CandidateState],
        lease_key: str,
        token: str,
        **fields: Any,
    ) -> bool:
        """transition_candidate for the lease holder: the lease check, the compare-and-set and the
        extra fields in one script. False when the state was not one of ``allowed_from``."""
        allowed = [s.value for s in allowed_from]
        extra = {k: v for k, v in fields.items() if v is not None}
        if new is CandidateState.running:
            extra.setdefault("started_at", utcnow())
        if new in FINAL_CANDIDATE_STATES:
            extra.setdefault("finished_at", utcnow())
        pairs = [part for k, v in extra.items() for part in (k, _encode(v))]
        result = int(
            self._fenced_cas(
                keys=[lease_key, self._key(comparison_id, "cand", label)],
                args=[token, new.value, len(allowed), *allowed, *pairs],
            )
        )
        if result < 0:
            raise LeaseLost(lease_key)
        return bool(result)

    def force_release(self, lease_key: str) -> None:
        """Drop a lease whose holder is known to be gone (its process was killed)."""
        self.r.delete(lease_key)

    def expect_task(self, comparison_id: str, step: str, task_id: str, *, within_s: float) -> None:
        """A task for ``step`` was just published (or will run after a countdown): the sweep
        leaves the step alone for ``within_s`` seconds even though no lease shows it running."""
        key = self._key(comparison_id, "expect", step)
        self.r.set(key, task_id, ex=max(1, int(within_s + 0.999)))

    def steps_in_flight(self, comparison_id: str, steps: list[str]) -> dict[str, bool]:
        """Per step: a lease is held, or a task for it is expected soon."""
        pipe = self.r.pipeline(transaction=False)
        for step in steps:
            pipe.exists(self.lease_key(comparison_id, step))
            pipe.exists(self._key(comparison_id, "expect", step))
        replies = pipe.execute()
        return {step: bool(replies[2 * i] or replies[2 * i + 1]) for i, step in enumerate(steps)}

    def begin_attempt(self, comparison_id: str, label: str) -> int:
        """Count a start of the candidate that has not ended yet; returns how many there are, this
        one included. A start whose process dies (out of memory, SIGKILL) is never uncounted."""
        key = self._key(comparison_id, "unended")
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(key, label, 1)
        if self.ttl_s:
            pipe.expire(key, self.ttl_s)
        count, *_ = pipe.execute()
        return int(count)

    def end_attempt(self, comparison_id: str, label: str) -> None:
        self._decrement_floor(keys=[self._key(comparison_id, "unended")], args=[label])

    def count_requeue(self, comparison_id: str, step: str) -> int:
        key = self._key(comparison_id, "requeues")
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(key, step, 1)
        if self.ttl_s:
            pipe.expire(key, self.ttl_s)
        count, *_ = pipe.execute()
        return int(count)

    def suspect_since(self, comparison_id: str, step: str, now: float) -> float:
        """When the sweep first saw ``step`` with nothing running or queued for it."""
        key = self._key(comparison_id, "suspect")
        pipe = self.r.pipeline(transaction=True)
        pipe.hsetnx(key, step, repr(now))
        pipe.hget(key, step)
        if self.ttl_s:
            pipe.expire(key, self.ttl_s)
        _, first, *_ = pipe.execute()
        return float(first)

    def clear_suspects(self, comparison_id: str, steps: list[str]) -> None:
        if steps:
            self.r.hdel(self._key(comparison_id, "suspect"), *steps)

    def ended_labels(self, comparison_id: str) -> set[str]:
        return set(self.r.smembers(self._key(comparison_id, "ended")))

    def unmark_ended(self, comparison_id: str, label: str) -> None:
        self.r.srem(self._key(comparison_id, "ended"), label)

    def claim_finalize(self, comparison_id: str) -> bool:
        """True for the one caller that should queue the summary step once every candidate ended."""
        return bool(self.r.set(self._key(comparison_id, "finalize_claim"), "1", nx=True, ex=self.ttl_s))

    def release_finalize_claim(self, comparison_id: str) -> None:
        self.r.delete(self._key(comparison_id, "finalize_claim"))

    @property
    def _open(self) -> str:
        return f"{self.prefix}:open"

    def mark_open(self, comparison_id: str) -> None:
        """The comparison has started: it owes a summary step until mark_finalized."""
        self.r.zadd(self._open, {comparison_id: datetime.now(UTC).timestamp()}, nx=True)

    def mark_finalized(self, comparison_id: str) -> None:
        """The summary step ran to the end: the MLflow parent run (if any) is no longer RUNNING."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._key(comparison_id), "finalized_at", utcnow())
        pipe.zrem(self._open, comparison_id)
        pipe.execute()

    def is_finalized(self, comparison_id: str) -> bool:
        return bool(self.r.hexists(self._key(comparison_id), "finalized_at"))

    def unfinished_comparisons(self) -> list[str]:
        """Comparisons the workers still owe something: queued or running ones, and started ones
        whose summary step has not run (a cancelled one's parent run may still read RUNNING)."""
        opened = self.r.zrange(self._open, 0, -1)
        ids = list(dict.fromkeys([*self.r.zrange(self._index, 0, -1), *opened]))
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for cid in ids:
            pipe.hmget(self._key(cid), ["status", "finalized_at"])
        unfinished, gone = [], []
        for cid, (status, finalized) in zip(ids, pipe.execute(), strict=True):
            if status is None:
                gone.append(cid)  # expired with its comparison
            elif status in (ComparisonStatus.queued.value, ComparisonStatus.running.value) or (
                cid in opened and not finalized
            ):
                unfinished.append(cid)
        if gone:
            self.r.zrem(self._open, *gone)
        return unfinished

    def take_sweep_turn(self, *, every_s: float) -> bool:
        """True for one caller per ``every_s`` seconds across every worker."""
        return bool(self.r.set(f"{self.prefix}:sweep", "1", nx=True, px=max(1, int(every_s * 1000))))

    # ---- worker caches: generated outputs (the response cache) and published custom metrics.
    # The keys are built here only; services/worker/response_cache.py and custom_metrics.py and
    # the gateway's metric registry go through these methods.
    def response_cache_key(self, digest: str) -> str:
        return f"{self.prefix}:gen:{digest}"

    def cached_responses(self, digests: list[str]) -> list[str | None]:
        """The stored JSON of each generated output, or None where there is none."""
        if not digests:
            return []
        return list(self.r.mget([self.response_cache_key(d) for d in digests]))

    def cache_responses(self, entries: dict[str, str], *, ttl_s: int) -> None:
        if not entries:
            return
        pipe = self.r.pipeline(transaction=False)
        for digest, raw in entries.items():
            pipe.set(self.response_cache_key(digest), raw, ex=ttl_s)
        pipe.execute()

    def response_cache_keys(self) -> Iterator[str]:
        """Every response-cache entry (for benchmarks that start from an empty cache)."""
        return iter(self.r.scan_iter(match=self.response_cache_key("*"), count=1000))

    @property
    def _custom_metrics(self) -> str:
        return f"{self.prefix}:metrics:custom"

    def publish_custom_metrics(self, descriptions: dict[str, str]) -> None:
        """Record the custom metrics a worker can run (name -> JSON description)."""
        if descriptions:
            self.r.hset(self._custom_metrics, mapping=descriptions)

    def published_custom_metrics(self) -> dict[str, str]:
        return dict(self.r.hgetall(self._custom_metrics) or {})

    # ---- remote endpoints: an endpoint candidate's generated rows, and each endpoint's concurrency
    # shared by every I/O worker (services/worker/remote.py).
    def fenced_save_remote_generation(
        self, comparison_id: str, label: str, generation: dict[str, Any], *, lease_key: str, token: str
    ) -> None:
        held = self._fenced_set(
            keys=[lease_key, self._key(comparison_id, "remote", label)],
            args=[token, json.dumps(generation), self.ttl_s or 0],
        )
        if not held:
            raise LeaseLost(lease_key)

    def remote_generation(self, comparison_id: str, label: str) -> dict[str, Any] | None:
        """What the I/O worker generated for an endpoint candidate (rows, totals, or the reason
        it could not), or None before it has."""
        raw = self.r.get(self._key(comparison_id, "remote", label))
        return json.loads(raw) if raw is not None else None

    def has_remote_generation(self, comparison_id: str, label: str) -> bool:
        """Whether the I/O worker has stored the candidate's generation (without reading it)."""
        return bool(self.r.exists(self._key(comparison_id, "remote", label)))

    def _endpoint_key(self, name: str, part: str) -> str:
        return f"{self.prefix}:endpoint:{name}:{part}"

    def endpoint_acquire(self, name: str, token: str, *, max_concurrency: int, hold_s: float) -> bool:
        """Take one of the endpoint's request slots, if one is free under its adaptive limit. The
        slot is released by endpoint_release, or by itself after ``hold_s``."""
        return bool(
            self._endpoint_acquire(
                keys=[self._endpoint_key(name, "slots"), self._endpoint_key(name, "limit")],
                args=[token, max_concurrency, hold_s],
            )
        )

    def endpoint_release(self, name: str, token: str) -> None:
        self.r.zrem(self._endpoint_key(name, "slots"), token)

    def endpoint_in_flight(self, name: str) -> int:
        """Slots held now (expired holders included until the next acquire sweeps them)."""
        return int(self.r.zcard(self._endpoint_key(name, "slots")))

    def endpoint_congested(self, name: str, *, max_concurrency: int) -> float:
        """The endpoint answered 429: halve its limit (once per cooldown). Returns the limit."""
        return float(
            self._endpoint_adapt(
                keys=[self._endpoint_key(name, "limit")],
                args=[max_concurrency, "cut", ENDPOINT_CUT_COOLDOWN_S, ENDPOINT_LIMIT_TTL_S],
            )
        )

    def endpoint_succeeded(self, name: str, *, max_concurrency: int) -> float:
        """A request succeeded: grow the limit by 1/limit, up to max_concurrency."""
        return float(
            self._endpoint_adapt(
                keys=[self._endpoint_key(name, "limit")],
                args=[max_concurrency, "grow", ENDPOINT_CUT_COOLDOWN_S, ENDPOINT_LIMIT_TTL_S],
            )
        )

    def endpoint_limit(self, name: str, *, max_concurrency: int) -> float:
        """The endpoint's adaptive limit now (max_concurrency when nothing cut it lately)."""
        raw = self.r.hget(self._endpoint_key(name, "limit"), "limit")
        return min(float(raw), max_concurrency) if raw else float(max_concurrency)

    def ping(self) -> bool:
        return bool(self.r.ping())


def _encode(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


# ---- decoding: the one place that reads a stored hash's strings. A field may be absent (a
# record stored before it existed, or one not written yet): it reads as its default.
def _decode_comparison(data: Mapping[str, str]) -> ComparisonRecord:
    return ComparisonRecord(
        id=data["id"],
        spec=ComparisonSpec.model_validate_json(data["spec"]),
        status=ComparisonStatus(data["status"]),
        created_at=datetime.fromisoformat(data["created_at"]),
        # Comparisons stored before owners existed belong to the local owner.
        owner=data.get("owner") or LOCAL_OWNER,
        rows=_int(data, "rows"),
        started_at=_time(data, "started_at"),
        finished_at=_time(data, "finished_at"),
        finalized_at=_time(data, "finalized_at"),
        experiment_id=data.get("experiment_id"),
        parent_run_id=data.get("parent_run_id"),
        error=data.get("error"),
        pairwise=tuple(_json(data, "pairwise") or ()),
        judge_ranking=_json(data, "judge_ranking"),
        judge_ranking_unavailable=data.get("judge_ranking_unavailable"),
    )


def _decode_candidate(data: Mapping[str, str]) -> CandidateRecord:
    return CandidateRecord(
        label=data["label"],
        model=data["model"],
        status=CandidateState(data["status"]),
        done=_int(data, "done"),
        total=_int(data, "total"),
        tokens_per_second=_float(data, "tokens_per_second"),
        eta_s=_float(data, "eta_s"),
        cache_hits=_int(data, "cache_hits"),
        metrics=_json(data, "metrics") or {},
        aggregates=_json(data, "aggregates") or {},
        metrics_unavailable=_json(data, "metrics_unavailable") or {},
        run_id=data.get("run_id"),
        worker=data.get("worker"),
        rows_failed=_int(data, "rows_failed"),
        totals=_json(data, "totals") or {},
        error=data.get("error"),
        started_at=_time(data, "started_at"),
        generation_started_at=_time(data, "generation_started_at"),
        finished_at=_time(data, "finished_at"),
    )


def _int(data: Mapping[str, str], name: str) -> int:
    raw = data.get(name)
    return int(raw) if raw else 0


def _float(data: Mapping[str, str], name: str) -> float | None:
    raw = data.get(name)
    return float(raw) if raw else None


def _time(data: Mapping[str, str], name: str) -> datetime | None:
    raw = data.get(name)
    return datetime.fromisoformat(raw) if raw else None


def _json(data: Mapping[str, str], name: str) -> Any:
    raw = data.get(name)
    return json.loads(raw) if raw else None


__all__ = [
    "FINAL_COMPARISON_STATUSES",
    "CandidateRecord",
    "ComparisonNotFound",
    "ComparisonRecord",
    "ComparisonSpec",
    "ComparisonStore",
    "LeaseLost",
    "utcnow",
]
