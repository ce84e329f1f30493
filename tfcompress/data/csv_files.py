"""Reading labelled texts from CSV files with the csv module.

The file is decoded as a whole with ``surrogateescape``, so each undecodable byte
becomes a lone surrogate that no valid text contains. That lets the reader find the
rows holding such bytes, and their line numbers, after csv has handled quotes and
embedded newlines.
"""

import collections
import csv
import io
import logging
import os
import re
import warnings


from tfcompress.data.dataset import TextDataset

logger = logging.getLogger(__name__)

_UNDECODABLE = re.compile("[\udc80-\udcff]")
_SHOWN_LINES = 5


def normalize_whitespace(text):
    """Collapse every run of whitespace (newlines and tabs included) to one space and strip."""
    return " ".join(text.split())


class _SkippedRows:
    """Line numbers of skipped rows, by reason."""

    def __init__(self):
        self.lines = collections.OrderedDict()

    def add(self, reason, line):
        self.lines.setdefault(reason, []).append(line)

    def __len__(self):
        return sum(len(v) for v in self.lines.values())

    def describe(self):
        parts = []
        for reason, lines in self.lines.items():
            shown = ", ".join(str(n) for n in lines[:_SHOWN_LINES])
            more = ", ..." if len(lines) > _SHOWN_LINES else ""
            parts.append(f"{len(lines)} {reason} (line {shown}{more})")
        return "; ".join(parts)


def read_csv(path, text_column, label_column, labels=None, encoding="utf-8", errors="skip",
             drop_duplicates=True, delimiter=","):
    """Read a CSV into a ``TextDataset``; return it and the skipped rows.

    Arguments are those of ``from_csv``, which warns about the skipped rows; this
    function only returns them so callers can report them their own way.
    """
    path = os.fspath(path)
    if errors not in ("skip", "replace"):
        raise ValueError(f"errors must be 'skip' or 'replace'; received {errors!r}.")
    if labels is not None:
        labels = tuple(labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"labels must list at least two distinct names; received {labels!r}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV file not found: {path!r}.")
    with open(path, "rb") as f:
        data = f.read()
    text = data.decode(encoding, errors="surrogateescape" if errors == "skip" else "replace")
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise ValueError(f"CSV file {path!r} is empty; it needs a header row and data rows.")

    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader)
    columns = [normalize_whitespace(c) for c in header]
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise ValueError(
            f"CSV file {path!r} has no column {missing[0]!r}; the header has the columns "
            f"{columns}. Pass text_column and label_column from that list."
        )
    text_index, label_index = columns.index(text_column), columns.index(label_column)

    skipped = _SkippedRows()
    rows = []
    end_line = reader.line_num
    for row in reader:
        start_line, end_line = end_line + 1, reader.line_num
        if not any(field.strip() for field in row):
            skipped.add("empty rows", start_line)
        elif len(row) != len(header):
            skipped.add(f"rows without {len(header)} fields", start_line)
        elif any(_UNDECODABLE.search(field) for field in row):
            skipped.add(f"rows with bytes that are not valid {encoding}", start_line)
        elif not normalize_whitespace(row[text_index]):
            skipped.add("rows with empty text", start_line)
        elif not row[label_index].strip():
            skipped.add("rows with empty label", start_line)
        else:
            rows.append((normalize_whitespace(row[text_index]), row[label_index].strip(),
                         start_line))
    if not rows:
        raise ValueError(
            f"CSV file {path!r} has no usable data rows"
            + (f"; skipped {skipped.describe()}." if len(skipped) else ".")
        )

    # Labels: the given order, else sorted names.
    found = sorted({label for _, label, _ in rows})
    if labels is None:
        labels = tuple(found)
    unknown = [name for name in found if name not in labels]
    if unknown:
        raise ValueError(
            f"column {label_column!r} of {path!r} has the values {unknown} that are not in "
            f"labels={list(labels)}; add them to labels or remove those rows."
        )
    if len(found) < 2:
        raise ValueError(
            f"column {label_column!r} of {path!r} has only one class, {found[0]!r}, in "
            f"{len(rows)} rows; a classifier needs at least two. Check label_column."
        )

    if drop_duplicates:
        rows = _drop_duplicates(rows, skipped)
    index = {name: i for i, name in enumerate(labels)}
    dataset = TextDataset([t for t, _, _ in rows], [index[label] for _, label, _ in rows], labels)
    return dataset, skipped


def _drop_duplicates(rows, skipped):
    """Keep the first row of each text; drop every copy of a text labelled two ways."""
    label_sets = collections.defaultdict(set)
    for text, label, _ in rows:
        label_sets[text].add(label)
    kept, seen = [], set()
    for text, label, line in rows:
        if len(label_sets[text]) > 1:
            skipped.add("rows whose text also appears with another label", line)
        elif text in seen:
            skipped.add("duplicate rows", line)
        else:
            seen.add(text)
            kept.append((text, label, line))
    return kept


def from_csv(path, text_column, label_column, labels=None, encoding="utf-8", errors="skip",
             drop_duplicates=True, delimiter=","):
    """Load labelled texts from a CSV file.

    The csv module handles quoted fields, embedded newlines and a UTF-8 byte order
    mark. Whitespace in each text is collapsed to single spaces. Rows that are empty,
    have the wrong number of fields, an empty text or label, or (with
    ``errors="skip"``) bytes that are not valid in ``encoding`` are skipped, and one
    warning gives their count and first line numbers.

    Args:
      path: the CSV file, with a header row.
      text_column: header name of the text column.
      label_column: header name of the label column.
      labels: label names in index order; the sorted names found if None. A label
        outside this list is an error.
      encoding: text encoding of the file.
      errors: "skip" drops rows with undecodable bytes; "replace" keeps them, each
        undecodable byte replaced by U+FFFD.
      drop_duplicates: keep one row of each text (after whitespace normalisation), and
        drop texts that appear with two different labels, so that no text is in both
        the training and the test split.
      delimiter: field separator.

    Returns:
      A ``TextDataset`` in file order; ``tfcompress.data.split`` splits it.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is empty, a column is missing, the label column has one
        class, or a label is not in ``labels``.
    """
    dataset, skipped = read_csv(path, text_column, label_column, labels=labels,
                                encoding=encoding, errors=errors,
                                drop_duplicates=drop_duplicates, delimiter=delimiter)
    if len(skipped):
        warnings.warn(f"skipped {len(skipped)} rows of {os.fspath(path)!r}: {skipped.describe()}.",
                      stacklevel=2)
    logger.info("read %d texts from %s", len(dataset), os.fspath(path))
    return dataset



