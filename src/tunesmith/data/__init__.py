"""Data loading, label handling and splitting.

Records are plain dicts (``text``, optional ``text_pair``, ``label``,
``source``) so every later stage can report the exact file and line of a row.
"""

from tunesmith.data.labels import (
    build_label_list,
    check_labels,
    label_counts,
    normalise_label,
)
from tunesmith.data.loading import FORMATS, filter_labels, load_records
from tunesmith.data.splits import cap_records, stratified_split

__all__ = [
    "FORMATS",
    "build_label_list",
    "cap_records",
    "check_labels",
    "filter_labels",
    "label_counts",
    "load_records",
    "normalise_label",
    "stratified_split",
]
