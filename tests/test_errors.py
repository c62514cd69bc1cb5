"""One-line messages: a library's long error is shortened at a clause boundary, never mid-sentence."""

from clora.errors import one_line, shorten

LONG = (
    "Cannot load model nobody/not-a-model: model is not cached locally and an error occurred while trying "
    "to fetch metadata from the Hub. Please check out the root cause in the stacktrace above, and make sure "
    "that the repository exists, that you are logged in, and that your network connection works."
)


def test_a_long_message_is_cut_after_a_clause_with_an_ellipsis():
    for limit in (60, 120, 200):
        short = one_line(RuntimeError(LONG + "\nsecond line"), limit=limit)
        assert len(short) <= limit and short.endswith(" ...")
        kept = short.removesuffix(" ...")
        assert LONG.startswith(kept)
        # the cut falls where a sentence or a clause ends, never inside one
        assert kept[-1] in ".!?)" or LONG[len(kept)] in ",;:", (limit, short)


def test_short_messages_are_kept_whole_and_only_the_first_line_is_quoted():
    assert one_line(ValueError("bad header, expected 8 bytes\ntraceback noise")) == "bad header, expected 8 bytes"
    assert one_line(ValueError("")) == "ValueError"


def test_one_endless_clause_is_cut_between_words():
    text = "word " * 100
    short = shorten(text, limit=50)
    assert len(short) <= 50 and short.endswith("word ...")
