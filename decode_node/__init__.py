"""The decode node: an engine in the `kv_consumer` role.

A decode job arrives with the prompt, the token the prefill node sampled, and a KV handle
(`kv_transfer_params`). The node allocates blocks, pulls the producer's blocks into them
in the background while it keeps decoding its other requests, and then continues the
generation. If the KV cannot be loaded, the load-failure policy decides: recompute what
is missing here, or fail the request. `python -m decode_node --spec JSON`; with
`--colocated` it runs role `both` (prefill and decode in one node; KV transfer only as
`kv_both`, when router.disaggregation.mode lets colocated nodes lend KV to each other).
"""

KV_ROLE = "kv_consumer"
