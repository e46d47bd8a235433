"""Reading a local JSONL / JSON / CSV / Parquet file into records (one dict per row).

Files are read with ``datasets.load_dataset``. JSON files are first checked line by line here, so a
syntax error is reported with its line number instead of a pyarrow traceback.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from salf.errors import SalfError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


SHOW_ROWS = 5  # how many offending lines/rows an error message names


# Reading files
def records_from_file(path: str | Path) -> list[dict]:
    """The rows of a local data file as dicts, with clear errors for the usual mistakes."""
    path = Path(path)
    if not path.exists():
        raise SalfError(f"data file {str(path)!r} does not exist", "check the path (relative to the current directory)")
    if path.is_dir():
        raise SalfError(f"{str(path)!r} is a directory, not a data file", "pass one .jsonl, .json, .csv or .parquet file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SalfError(
            f"cannot tell the format of {str(path)!r} from its extension {path.suffix or '(none)'!r}",
            f"use one of: {', '.join(FORMATS)}",
        )
    if path.stat().st_size == 0:
        raise SalfError(f"data file {str(path)!r} is empty", "fill it with rows, one example each")
    if fmt in ("json", "csv"):
        _check_utf8(path)
    if fmt == "json":
        _check_json(path)
    rows = _load_with_datasets(path, fmt)
    if not rows:
        raise SalfError(f"data file {str(path)!r} has no rows", "fill it with rows, one example each")
    return rows


def _check_utf8(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """Text files must be UTF-8: say so, with the line of the first bad byte, instead of a decoding traceback."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                # The decoder may hold up to 3 bytes of an unfinished character from the chunk before.
                where = line + chunk[: max(e.start - len(e.object) + len(chunk), 0)].count(b"\n")
                raise SalfError(
                    f"data file {str(path)!r} is not UTF-8 text: line {where} has the byte "
                    f"{e.object[e.start:e.start + 1]!r}, which UTF-8 does not allow there",
                    f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name} "
                    "(name the encoding it is in after -f)",
                ) from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise SalfError(
                f"data file {str(path)!r} is not UTF-8 text: it ends inside a character",
                "re-encode the file as UTF-8 (e.g. with iconv), or check that it was copied whole",
            ) from None


def _check_json(path: Path) -> None:
    """Parse the file here first: datasets' own errors do not say which line is broken."""
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if not stripped:
        raise SalfError(f"data file {str(path)!r} is empty", "fill it with rows, one example each")
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise _json_error(path, [f"line {e.lineno}: {e.msg} (column {e.colno})"]) from None
        bad = [f"item {i + 1}: expected a JSON object, found {_kind(r)}" for i, r in enumerate(rows) if not isinstance(r, dict)]
        if bad:
            raise _json_error(path, bad)
        return
    if path.suffix.lower() == ".json" and "\n" in stripped.rstrip() and _is_one_object(text):
        raise SalfError(
            f"{str(path)!r} holds one JSON object over several lines, not a list of rows",
            "write a list of objects ([{...}, {...}]) or one object per line (JSON lines)",
        )
    problems = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters that
    # splitlines() breaks on, and datasets counts lines by "\n" too.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: {e.msg} (column {e.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"line {number}: expected a JSON object {{...}}, found {_kind(row)}")
    if problems:
        raise _json_error(path, problems)


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _json_error(path: Path, problems: list[str]) -> SalfError:
    shown = "; ".join(problems[:SHOW_ROWS]) + (f"; and {len(problems) - SHOW_ROWS} more" if len(problems) > SHOW_ROWS else "")
    return SalfError(
        f"{str(path)!r} is not valid JSON lines ({len(problems)} bad line(s)): {shown}",
        "write one JSON object per line, e.g. {\"text\": \"...\", \"label\": \"...\"}",
    )


def _load_with_datasets(path: Path, fmt: str) -> list[dict]:
    from datasets import load_dataset  # heavy import, only when a file is read

    try:
        dataset = load_dataset(fmt, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as e:  # datasets/pyarrow raise many types; the user needs the message, not the type
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if e.__cause__ is not None and str(e.__cause__).strip():
            cause += f" ({str(e.__cause__).strip().splitlines()[0]})"
        raise SalfError(
            f"could not read {str(path)!r} as {fmt}: {cause}",
            "check the file: every row needs the same fields with the same value types "
            "(e.g. labels all strings or all integers); CSV needs a header row",
        ) from e
    return dataset.to_list()


def quoted_rows(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:SHOW_ROWS]))
    return shown + (f", ... ({len(numbers)} in all)" if len(numbers) > SHOW_ROWS else "")


__all__ = ["FORMATS", "records_from_file"]
