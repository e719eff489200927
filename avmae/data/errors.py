"""Errors raised for bad input data. Each message names the file (and record) and the fix."""


class DataError(ValueError):
  """Base class: something about a dataset on disk is wrong."""


class CorruptRecordError(DataError):
  """A record's CRC does not match, or its bytes do not parse. `skip_corrupt` skips these."""

  def __str__(self) -> str:
    return (f"{super().__str__()}. Regenerate the shard, or set data.skip_corrupt=True to skip "
            "corrupt records and count them.")


class TruncatedShardError(DataError):
  """A shard ends in the middle of a record."""


class MissingShardError(DataError):
  """A shard listed in dataset_info.json is not on disk."""


class MissingIndexError(DataError):
  """A shard has no sidecar index."""


class StaleIndexError(DataError):
  """A sidecar index does not describe its shard (shard rewritten, index damaged)."""


class SchemaError(DataError):
  """dataset_info.json or a record does not match the schema this code reads."""
