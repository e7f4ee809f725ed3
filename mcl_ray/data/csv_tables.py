"""CSV files as users have them, read so that nothing in them can stop the read.

Any dialect (delimiter, quoting, escapes, null tokens, encoding, header or not: `TableRef`).
Every column is read as text: a value that does not fit its column, anywhere in a file, reaches
validation, which quarantines the row as `bad_type:<column>` (pyarrow's type inference looks at the
first block only, and a word in a numeric column further down used to fail the whole read). A
line the parser cannot split into the header's fields (a wrong field count, broken quoting)
becomes a row of its own: all columns null, its raw text in MALFORMED and its line number in
LINE, so that validation quarantines it as `malformed_line` with file and line.

Files are streamed block by block (`pyarrow.csv.open_csv`): memory per reader is a block, not a file.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv

from mcl_ray.core.config import TableRef

MALFORMED = "_malformed"  # raw text of a line that is not a row of the header's columns
LINE = "_line"  # its line number in the file (1 = the first line), when the parser knows it
PATH = "path"  # the file a row came from (the column Ray Data's include_paths also writes)
BLOCK_BYTES = 16 << 20


def column_names(path: str, ref: TableRef) -> list[str]:
    """The header's names (or `column_names` for a file without a header)."""
    if not ref.header:
        return list(ref.column_names or [])
    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(encoding=ref.encoding, block_size=1 << 16),
                            parse_options=_parse_options(ref, lambda row: "skip"),  # the rows come later
                            convert_options=pacsv.ConvertOptions(check_utf8=False))
    names = reader.schema.names
    reader.close()
    return names


def _parse_options(ref: TableRef, on_invalid) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter=ref.delimiter, quote_char=ref.quote_char or False,
                              double_quote=ref.escape_char is None, escape_char=ref.escape_char or False,
                              invalid_row_handler=on_invalid)


def read_blocks(path: str, ref: TableRef, block_bytes: int = BLOCK_BYTES) -> Iterator[pa.Table]:
    """The file as text-typed tables of about `block_bytes` each, plus PATH, MALFORMED and LINE."""
    names = column_names(path, ref)
    bad: list[tuple[int | None, str]] = []

    def on_invalid(row) -> str:  # keep the line: it becomes a quarantine row, never a silent skip
        bad.append((row.number, row.text))
        return "skip"

    reader = pacsv.open_csv(
        path,
        # One thread per file (Ray runs files in parallel): the parser then knows each line's number.
        # The header is read as a header (skip_rows would lose the numbering).
        read_options=pacsv.ReadOptions(encoding=ref.encoding, column_names=None if ref.header else names,
                                       use_threads=False, block_size=block_bytes),
        parse_options=_parse_options(ref, on_invalid),
        # check_utf8=False: undecodable text reaches validation, which names the row
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, null_values=ref.null_values,
                                             strings_can_be_null=True, quoted_strings_can_be_null=True,
                                             check_utf8=False))
    schema = pa.schema([(n, pa.string()) for n in names] + [(PATH, pa.string()), (MALFORMED, pa.string()),
                                                             (LINE, pa.int64())])
    for batch in reader:
        n = batch.num_rows
        yield pa.Table.from_batches([batch]).append_column(PATH, pa.array([path] * n, pa.string())).append_column(
            MALFORMED, pa.nulls(n, pa.string())).append_column(LINE, pa.nulls(n, pa.int64()))
        if bad:
            yield _malformed(bad, names, path, schema)
            bad.clear()
    if bad:
        yield _malformed(bad, names, path, schema)


def _malformed(bad: list[tuple[int | None, str]], names: list[str], path: str, schema: pa.Schema) -> pa.Table:
    n = len(bad)
    cols = [pa.nulls(n, pa.string()) for _ in names]
    cols += [pa.array([path] * n, pa.string()), pa.array([t for _, t in bad], pa.string()),
             pa.array([ln for ln, _ in bad], pa.int64())]
    return pa.Table.from_arrays(cols, schema=schema)


def read_files_batch(batch: pa.Table, ref: dict) -> Iterator[pa.Table]:
    """Ray Data `map_batches` body: a batch of file paths -> their rows, block by block."""
    table_ref = TableRef.model_validate(ref)
    for path in batch.column("file").to_pylist():
        yield from read_blocks(path, table_ref)


def read_table(paths: list[str], ref: TableRef) -> pa.Table:
    """A small table (users, items) in the driver, read the same way."""
    tables = [t for p in paths for t in read_blocks(p, ref)]
    return pa.concat_tables(tables) if tables else pa.table({})
