"""The one error type the data layer raises for problems the user can fix (a path, a split name, a column name).
It is a ValueError so that callers that already treat bad configuration as ValueError keep working; its message is
one line naming the problem and the fix, so the CLI can print it without a traceback."""

from pathlib import Path


class DataError(ValueError):
    """A task's data cannot be loaded as configured; the message says why and what to change."""


def not_text(path: str | Path, err: UnicodeDecodeError) -> DataError:
    """The error for a data file that does not decode as text (compressed, binary, another encoding)."""
    return DataError(f"{path} is not a UTF-8 text file (undecodable byte at offset {err.start}): is it compressed "
                     "or binary? point the task at the extracted TSV / CSV / JSON file")


def read_text(path: Path) -> str:
    """The text of a UTF-8 data file, a byte-order mark (Windows editors write one) left out; one that does not
    decode (binary, compressed) is a DataError naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise not_text(path, err) from None
