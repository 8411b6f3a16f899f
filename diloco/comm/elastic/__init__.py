"""Elastic worker groups: membership through a coordinator, healing, and the per-round average.

* :mod:`.coordinator` — the job's coordinator process: torchft's lighthouse + a rendezvous store;
* :mod:`.membership` — one quorum per round, heartbeats, the cross-group process groups;
* :mod:`.heal` — sending θ, the outer state and the counters to a joining group, shard by shard;
* :mod:`.reducer` — :class:`ElasticReducer`, the reducer of an elastic run (quorum, heal,
  exchange, redo).

The design and its guarantees are in docs/elastic.md.
"""
