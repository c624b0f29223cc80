"""The writer's user-facing error (kept in a module of its own so the CLI can name it cheaply)."""


class ShardWriterError(ValueError):
    """The input or the options cannot produce shards (named source, missing column, bad option)."""
