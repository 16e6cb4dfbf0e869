"""Data: sources (builtin, files, hub), row formats and templating, tokenization with
loss masks, and collators."""

from polmctl.data.builtin import BUILTIN_SOURCES, extract_answer
from polmctl.data.collate import pack_collate, pad_collate
from polmctl.data.formats import detect_format, format_completion, format_prompt
from polmctl.data.sources import load_config_rows, load_rows
from polmctl.data.tokenize import EncodeStats, encode_dataset, encode_row

__all__ = [
    "BUILTIN_SOURCES",
    "EncodeStats",
    "detect_format",
    "encode_dataset",
    "encode_row",
    "extract_answer",
    "format_completion",
    "format_prompt",
    "load_config_rows",
    "load_rows",
    "pack_collate",
    "pad_collate",
]
