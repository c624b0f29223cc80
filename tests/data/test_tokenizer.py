import numpy as np
import pytest

from mtx_data_pipelines.tokenizer import ClipTokenizer

TEXTS = [
    "a photo of a cat",
    "",
    "   ",
    "Ünïcödé café naïve façade — “quotes” and ‘single’ ones",
    "日本語のテキストと中文字符 한국어 Ελληνικά русский",
    "emoji 🙂🚀👩‍👩‍👧 and symbols ∑∫√ ©®™",
    "&amp; html &lt;b&gt;entities&lt;/b&gt; it's we'll I'd they've you're",
    "  lots   of\twhite\n\nspace  ",
    "numbers 1234567 3.14159 1e-5 #hashtag @user http://example.com/a?b=c",
    "MiXeD CaSe ShOuTiNg!!!",
    "word " * 120,  # far over the context length: truncated, EOT kept last
    "mojibake: Ã©tÃ© and \u00e2\u0080\u0099",
    "a" * 300,  # one very long word
]


@pytest.fixture(scope="module")
def ours():
    return ClipTokenizer()


def test_ids_equal_open_clip(ours, open_clip):
    expected = open_clip.tokenize(TEXTS).numpy()
    got = ours(TEXTS)
    assert got.dtype == np.int64 and got.shape == (len(TEXTS), 77)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("context", [16, 32])
def test_short_context_truncates_like_open_clip(ours, open_clip, context):
    np.testing.assert_array_equal(ours(TEXTS, context_length=context),
                                  open_clip.tokenize(TEXTS, context_length=context).numpy())


def test_special_tokens_and_roundtrip(ours):
    ids = ours("a red circle")[0]
    assert ids[0] == ours.sot_id == 49406 and ours.eot_id == 49407 and ours.vocab_size == 49408
    n = int((ids != 0).sum())
    assert ids[n - 1] == ours.eot_id and ids[n:].sum() == 0
    assert ours.decode(ids) == "a red circle"
    long = ours("word " * 200)[0]
    assert long[-1] == ours.eot_id and (long != 0).all()


def test_clean_skips_ftfy_only_where_ftfy_changes_nothing():
    """Printable ASCII without '&' skips ftfy and HTML unescaping (their passes are half the encoding
    time of a short caption): the cleaned text equals the full path's on random such strings and on
    captions that need the full path."""
    import html
    import random

    import ftfy

    from mtx_data_pipelines.tokenizer import _clean

    def reference(text):
        return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split()).lower()

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127) if chr(c) != "&"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += ["A  Photo of THE cat ", "tom &amp; jerry", "a &lt;b&gt; tag", "line\r\nbreak", "tab\tstop", "nul\x00char",
              "\x1b[31mred\x1b[0m", "caf\u00e9", "cafÃ©", "\ufb01sh", "\u201cquoted\u201d", "ｗｉｄｅ", "&#39;s"]
    for text in texts:
        assert _clean(text) == reference(text), repr(text)
