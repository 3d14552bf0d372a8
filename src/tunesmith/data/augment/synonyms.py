"""Offline synonym sources for EDA: WordNet, or the model's own embedding neighbours.

WordNet is read with nltk's reader pointed at a plain WordNet 3.0 database
folder (Debian's ``wordnet-base`` installs one; no nltk download is needed).
That folder lacks the ``lexnames`` table nltk insists on opening, so the
reader here supplies WordNet 3.0's fixed list of lexicographer files itself;
synonyms never use it.

Embedding neighbours need nothing outside the model: the nearest whole-word
vocabulary entries of a word's input embedding (cosine), which for a
pretrained encoder are mostly inflections, near-synonyms and related words.
They are noisier than WordNet, which is why WordNet is the default.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from tunesmith.errors import ConfigError

#: Where a WordNet database is looked for when ``data.augment.wordnet_dir`` is null.
WORDNET_DIRS = ("/usr/share/wordnet",)
_STOP = """a about above after again against all am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself just
me more most my myself no nor not now of off on once only or other our ours ourselves out over own
same she should so some such than that the their theirs them themselves then there these they this
those through to too under until up very was we were what when where which while who whom why will
with would you your yours yourself yourselves"""
#: Function words EDA never replaces or inserts synonyms for.
STOP_WORDS = frozenset(_STOP.split())
_NOUN_FILES = """act animal artifact attribute body cognition communication event feeling food group
location motive object person phenomenon plant possession process quantity relation shape state
substance time"""
_VERB_FILES = """body change cognition communication competition consumption contact creation
emotion motion perception possession social stative weather"""
#: WordNet 3.0's lexicographer files, in file-number order (its ``lexnames`` table).
_LEXNAMES = (
    ["adj.all", "adj.pert", "adv.all", "noun.Tops"]
    + [f"noun.{n}" for n in _NOUN_FILES.split()]
    + [f"verb.{n}" for n in _VERB_FILES.split()]
    + ["adj.ppl"]
)


class SynonymSource(Protocol):
    """Anything that proposes replacement words for a lower-case word."""

    def synonyms(self, word: str) -> list[str]:
        """Single-word synonyms of ``word`` other than itself, in a fixed order."""
        ...


def find_wordnet(configured: str | None) -> Path:
    """The WordNet database folder to read.

    Raises:
        ConfigError: None found; the message says how to get one.
    """
    candidates = [configured] if configured else [os.environ.get("WORDNET_DIR"), *WORDNET_DIRS]
    for cand in candidates:
        if cand and (Path(cand) / "index.noun").is_file() and (Path(cand) / "data.noun").is_file():
            return Path(cand)
    where = configured or ", ".join(c for c in candidates if c)
    raise ConfigError(
        f"data.augment.synonyms: wordnet: no WordNet database (index.noun, data.noun) in "
        f"{where}; install Debian's wordnet-base package (scripts/setup.sh does), set "
        "data.augment.wordnet_dir, or use synonyms: embeddings"
    )


@lru_cache(maxsize=2)
def _wordnet_reader(folder: str) -> Any:
    try:
        import nltk.data
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        raise ConfigError(
            "data.augment.synonyms: wordnet needs nltk: pip install 'tunesmith[augment]'"
        ) from None

    class _PlainWordNet(WordNetCorpusReader):
        """nltk's reader over a bare WordNet 3.0 database folder."""

        def open(self, fileid: str) -> Any:
            if fileid == "lexnames":
                return io.StringIO("".join(f"{i:02d}\t{n}\t0\n" for i, n in enumerate(_LEXNAMES)))
            return super().open(fileid)

        def map_wn(self, version: str = "wordnet") -> None:
            return None  # no multilingual (OMW) data to map

    if folder not in nltk.data.path:  # nltk only reads folders on its data path
        nltk.data.path.append(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return _PlainWordNet(folder, None)


class WordNetSynonyms:
    """Lemma names of every WordNet sense of a word (one-word lemmas only)."""

    def __init__(self, folder: Path) -> None:
        self._wn = _wordnet_reader(str(folder))
        self._cache: dict[str, list[str]] = {}

    def synonyms(self, word: str) -> list[str]:
        if word not in self._cache:
            found: dict[str, None] = {}
            for synset in self._wn.synsets(word):
                for lemma in synset.lemma_names():
                    name = lemma.lower()
                    if name != word and name.isalpha():
                        found[name] = None
            self._cache[word] = list(found)
        return self._cache[word]


class EmbeddingSynonyms:
    """Nearest whole-word vocabulary entries in an input-embedding matrix (cosine).

    Args:
        tokenizer: The model's tokenizer (a word is looked up only if it is one token).
        embeddings: The input-embedding matrix, one row per vocabulary id.
        neighbours: How many neighbours to return per word.
    """

    def __init__(self, tokenizer: Any, embeddings: Any, neighbours: int = 10) -> None:
        import torch

        vocab: dict[str, int] = tokenizer.get_vocab()
        special = set(getattr(tokenizer, "all_special_ids", []))
        self._ids = {w: i for w, i in vocab.items() if w.isalpha() and i not in special}
        self._cand_words = sorted(self._ids, key=self._ids.__getitem__)
        cand = torch.tensor([self._ids[w] for w in self._cand_words])
        weight = embeddings.detach().float()
        self._cand = torch.nn.functional.normalize(weight[cand], dim=-1)
        self._weight = weight
        self._k = neighbours
        self._cache: dict[str, list[str]] = {}

    def prepare(self, words: Sequence[str]) -> None:
        """Look up many words in one matrix product (a training set's vocabulary)."""
        import torch

        todo = [w for w in dict.fromkeys(words) if w in self._ids and w not in self._cache]
        for start in range(0, len(todo), 1024):
            chunk = todo[start : start + 1024]
            query = torch.nn.functional.normalize(
                self._weight[torch.tensor([self._ids[w] for w in chunk])], dim=-1
            )
            top = (query @ self._cand.T).topk(self._k + 1, dim=-1).indices.tolist()
            for word, row in zip(chunk, top, strict=True):
                names = [self._cand_words[j] for j in row]
                self._cache[word] = [n for n in names if n.lower() != word][: self._k]

    def synonyms(self, word: str) -> list[str]:
        if word not in self._cache:
            if word not in self._ids:
                return []
            self.prepare([word])
        return self._cache[word]
