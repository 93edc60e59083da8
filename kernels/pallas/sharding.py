"""Running the NHA core once per shard (placeholder, replaced below)."""

import functools


def per_shard(core, **static):
    return functools.partial(core, **static)
