"""What ``max_length`` cuts off the answers of a generative data set, and the gate on it.

A chat whose reply is cut by ``data.max_length`` (or a seq2seq target cut by
``data.max_target_length``) still trains, silently: on half an answer, or on
an answer without the end-of-turn / EOS token, so the model never learns to
stop. Nothing in the loss shows it. Generative tasks therefore measure every
answer against its limit before the model loads (``Task.truncation``, from
the tokenizer alone) and a run refuses a training split where more than
``data.max_truncated_fraction`` of the rows are cut, naming the worst rows and
both fixes (a larger limit, or ``data.drop_truncated``).

The report is one type for every generative task: each row is a ``RowCut``
(what the limit left and took), and the report adds them up. Tasks fill it
from the same encoding their ``encode`` uses, so the gate measures exactly
what training would see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tunesmith.errors import DataError
from tunesmith.tasks.losses import IGNORE

#: Worst rows named in logs, errors and the audit.
WORST = 5


@dataclass(frozen=True)
class RowCut:
    """What the limits did to one training row (a chat or a source/target pair).

    Attributes:
        source: The row's locator (``file:line``).
        tokens: Tokens the row keeps (seq2seq: input plus target).
        trained: Trained tokens it keeps (labels that are not -100).
        needed: Tokens the answer side needs uncut (chat: the whole chat; seq2seq: the
            target), i.e. the limit at which nothing would be cut.
        lost: Trained tokens cut off.
        answer_cut: Part of an answer's content was cut.
        end_cut: The last trained end-of-turn / EOS token was cut.
        end_trained: A kept trained token is the end-of-turn / EOS token.
        input_lost: Input tokens cut off (seq2seq sources; chats lose inputs only with
            their answer).
    """

    source: str
    tokens: int
    trained: int
    needed: int
    lost: int = 0
    answer_cut: bool = False
    end_cut: bool = False
    end_trained: bool = False
    input_lost: int = 0

    @property
    def cut(self) -> bool:
        """The answer or its final end token was cut: what the gate counts."""
        return self.answer_cut or self.end_cut


def labels_cut(
    source: str, labels: Sequence[int], limit: int, end_id: int | None, *, tokens: int
) -> RowCut:
    """A row's facts from its *uncut* labels (-100: not trained) and the position limit.

    The first position predicts nothing (the loss is shifted), so it never counts
    as trained; ``end_id`` is the end-of-turn / EOS id trained answers end with.
    """
    kept, gone = labels[1:limit], labels[limit:]
    ends = [i for i, t in enumerate(labels) if end_id is not None and t == end_id]
    return RowCut(
        source=source,
        tokens=min(tokens, limit),
        trained=sum(t != IGNORE for t in kept),
        needed=tokens,
        lost=sum(t != IGNORE for t in gone),
        answer_cut=any(t not in (IGNORE, end_id) for t in gone),
        end_cut=bool(ends) and ends[-1] >= limit,
        end_trained=any(1 <= i < limit for i in ends),
    )


def lengths_cut(
    source: str, needed: int, limit: int, *, inputs: int, input_limit: int, has_end: bool
) -> RowCut:
    """A source/target row's facts from its uncut lengths (seq2seq).

    ``needed`` counts the target with its EOS; a cut target keeps its EOS (the
    last kept token is replaced by it), so only content is lost.
    """
    kept = min(needed, limit)
    return RowCut(
        source=source,
        tokens=min(inputs, input_limit) + kept,
        trained=kept,
        needed=needed,
        lost=max(needed - limit, 0),
        answer_cut=needed > limit,
        end_trained=has_end and kept > 0,
        input_lost=max(inputs - input_limit, 0),
    )


@dataclass
class TruncationReport:
    """Every answer of one split measured against its limit.

    Attributes:
        limit_key: The config key that cuts answers (``data.max_length`` for chats,
            ``data.max_target_length`` for seq2seq targets).
        limit: Its effective value (the model's position table may lower it).
        end_token: The end-of-turn / EOS token answers should end with trained
            (None: the tokenizer has none).
        rows: One ``RowCut`` per row with an answer, in split order.
        input_limit: The input limit (``data.max_length``) where inputs are cut apart
            from answers (seq2seq); None for chats.
        split: Which split was measured (``train``, ``validation``).
    """

    limit_key: str
    limit: int
    end_token: str | None
    rows: list[RowCut] = field(default_factory=list)
    input_limit: int | None = None
    split: str = "train"

    @property
    def cut(self) -> list[RowCut]:
        """Rows whose answer or final end token was cut."""
        return [r for r in self.rows if r.cut]

    @property
    def cut_fraction(self) -> float:
        """Share of rows cut: what ``data.max_truncated_fraction`` bounds."""
        return len(self.cut) / len(self.rows) if self.rows else 0.0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.rows)

    @property
    def trained_tokens(self) -> int:
        return sum(r.trained for r in self.rows)

    @property
    def trained_fraction(self) -> float:
        """Share of the kept tokens that are trained."""
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    @property
    def zero_trained(self) -> list[RowCut]:
        """Rows that train nothing at all (their whole answer lies beyond the limit)."""
        return [r for r in self.rows if r.trained == 0]

    @property
    def end_trained(self) -> bool:
        """Whether any row trains the end token (False: the model never learns to stop)."""
        return any(r.end_trained for r in self.rows)

    def worst(self, n: int = WORST) -> list[RowCut]:
        """The cut rows that lose the most trained tokens, worst first."""
        return sorted(self.cut, key=lambda r: (-r.lost, -r.needed))[:n]

    def refuses(self, max_fraction: float) -> bool:
        """True when more than ``max_fraction`` of the rows are cut."""
        return self.cut_fraction > max_fraction

    def cut_counts(self) -> str:
        """``3 of 40 train rows (7.5%) cut by data.max_length=64: ...`` (one clause)."""
        cut = self.cut
        answers = sum(r.answer_cut for r in cut)
        ends = sum(r.end_cut and not r.answer_cut for r in cut)
        end = self.end_token or "EOS"
        return (
            f"{len(cut):,} of {len(self.rows):,} {self.split} rows ({self.cut_fraction:.1%}) "
            f"cut by {self.limit_key}={self.limit}: {answers:,} lose part of the answer, "
            f"{ends:,} only the final {end}; {len(self.zero_trained):,} train nothing"
        )

    def lines(self) -> list[str]:
        """The report as lines: trained share, cuts, the end token, the worst rows."""
        out = [
            f"{self.split}: {self.trained_tokens:,} of {self.tokens:,} tokens trained "
            f"({self.trained_fraction:.1%})",
            self.cut_counts(),
        ]
        if self.input_limit is not None:
            inputs = sum(r.input_lost > 0 for r in self.rows)
            out.append(
                f"inputs cut by data.max_length={self.input_limit}: {inputs:,} rows "
                "(reported, not gated: their answer is whole)"
            )
        out.append(self.end_line())
        out += [f"  worst: {worst_row(r)}" for r in self.worst()]
        return out

    def end_line(self) -> str:
        """Whether the end-of-turn / EOS token is trained anywhere."""
        if self.end_token is None:
            return "the tokenizer has no EOS token: the model cannot learn where an answer ends"
        if self.end_trained or not self.rows:
            return f"end-of-turn token {self.end_token} is trained"
        why = (
            "the length limit cuts it off every answer"
            if any(r.end_cut for r in self.rows)
            else "does the chat template write it right after the reply?"
        )
        return (
            f"end-of-turn token {self.end_token} is never trained: the model will not learn "
            f"to stop ({why})"
        )

    def refusal(self, max_fraction: float) -> str:
        """Why the run is refused, with the counts, the threshold and both fixes."""
        longest = max(r.needed for r in self.cut)
        worst = "; ".join(worst_row(r) for r in self.worst())
        return (
            f"{self.cut_counts()}; data.max_truncated_fraction is {max_fraction:g}. Raise "
            f"{self.limit_key} (the longest row needs {longest:,} tokens), or set "
            f"data.drop_truncated: true to train without the cut rows. Worst: {worst}"
        )


def worst_row(row: RowCut) -> str:
    """``file:7 (12 trained tokens cut of 30 needed)``."""
    what = "answer" if row.answer_cut else "final end token"
    return f"{row.source} ({row.lost:,} trained tokens cut: {what}; needs {row.needed:,})"


def gate(report: TruncationReport, max_fraction: float, drop: bool) -> list[str]:
    """The sources of the training rows to drop; refuses a split cut beyond ``max_fraction``.

    Args:
        report: The training split's report.
        max_fraction: ``data.max_truncated_fraction``.
        drop: ``data.drop_truncated``: every cut row is dropped instead of refusing.

    Raises:
        DataError: More than ``max_fraction`` of the rows are cut and ``drop`` is off,
            or every row is cut (nothing would be left to train on).
    """
    cut = [r.source for r in report.cut]
    if drop:
        if cut and len(cut) == len(report.rows):
            raise DataError(
                f"data.drop_truncated would drop every training row: {report.cut_counts()}; "
                f"raise {report.limit_key}"
            )
        return cut
    if report.refuses(max_fraction):
        raise DataError(report.refusal(max_fraction))
    return []
