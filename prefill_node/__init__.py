"""The prefill node: an engine in the `kv_producer` role.

It batches prompts (chunked prefill, prefix caching), samples each request's first token,
and lends the request's KV blocks to the decode node the router names: the blocks stay
held (see kv_connector/producer_ledger.py) until the consumer has read them, or
abort_timeout_s passes without a claim. `python -m prefill_node --spec JSON`.
"""

KV_ROLE = "kv_producer"
