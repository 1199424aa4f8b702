#!/usr/bin/env python3
"""Writes the tokenizer reference fixtures used by tests/test_tokenizer.c.

The reference is Hugging Face `tokenizers` (Tokenizer.from_file /
from_str) encoding with add_special_tokens=False.  Outputs (committed, so the
tests need no Python):

  tests/data/tokenizer-fixtures/qwen3.json
      [{"text": ..., "ids": [...]}, ...] for the real Qwen3 tokenizer.
  tests/data/tokenizer-fixtures/variants.json
      [{"name": ..., "patch": {...}, "cases": [{"text", "ids"}]}, ...]
      Each variant is the Qwen3 tokenizer.json with `patch` applied (see
      apply_patch below; the C test applies the same patch with cJSON), so the
      configurations other tokenizers use (Llama-3: ignore_merges, no
      normaliser, merges as "a b" strings; GPT-2: ByteLevel with its own regex
      and add_prefix_space; added tokens with lstrip/rstrip/single_word/
      normalized) are checked against the reference too.

Usage: python3 tools/make_tokenizer_fixtures.py [path/to/tokenizer.json]
(default: the repo's tests/data/qwen3-tokenizer/tokenizer.json.zst).
"""
import copy
import json
import os
import subprocess
import sys
import unicodedata

from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "data", "tokenizer-fixtures")

CORPUS = [
    # English prose and punctuation
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times; it was the age of wisdom...",
    "  Leading spaces and trailing spaces   ",
    "Mr. O'Neil said: \"Don't panic!\" -- and left (quickly).",
    # contractions in various cases
    "it's we're they've I'm you'll he'd isn't",
    "IT'S WE'RE THEY'VE I'M YOU'LL HE'D ISN'T",
    "It'S We'Re THEY'Ve i'M You'LL He'D",
    "'s's 're're 'll 'LL 'Ll 'lL",
    "the dog's bone, the dogs' bones",
    # code
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Foo:\n\tdef __init__(self):\n\t\tself.x = {'a': [1, 2, 3]}\n",
    "#include <stdio.h>\n\nint main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
    "for (size_t i = 0; i < n; ++i) { a[i] += b[i] * c; }  // axpy",
    "x=1;y=2;z=x+y**2/3%4",
    "if (ptr != NULL && ptr->next->value >= 0x7fffffff) {}",
    # CJK
    "你好，世界！今天天气很好。",
    "机器学习是人工智能的一个分支。",
    "日本語のテキストです。カタカナとひらがな、そして漢字。",
    "한국어 문장입니다. 안녕하세요!",
    "中文English混合text测试123",
    # RTL and Indic
    "مرحبا بالعالم! هذا نص عربي.",
    "שלום עולם, זה טקסט בעברית.",
    "नमस्ते दुनिया। यह हिंदी पाठ है।",
    "Ελληνικά και Русский текст вместе.",
    # emoji
    "I love 🍕 and 🎉!",
    "Family: 👨\u200d👩\u200d👧\u200d👦 and 👩🏽\u200d💻 coder",
    "Thumbs 👍🏻👍🏼👍🏽👍🏾👍🏿",
    "Flags: 🇺🇸 🇯🇵 🇩🇪 🏳️\u200d🌈",
    "❤️ ☺️ ✔︎",
    # NFD input (NFC must compose) and combining marks
    unicodedata.normalize("NFD", "café résumé naïve Ångström"),
    unicodedata.normalize("NFD", "Việt Nam, tiếng Việt có dấu"),
    "e\u0301",
    "\u0301",
    "a\u0301\u0302\u0303 stacked",
    "\u0345 ypogegrammeni",
    "ﬁ ligature and ① circled and Ⅻ numeral",
    "\u212b angstrom sign and \u2126 ohm sign",
    # whitespace
    "a  b   c    d",
    "line one\nline two\r\nline three\rline four",
    "\n\n\n",
    "  \n ",
    "trailing spaces   ",
    "   ",
    " ",
    "\t\ttabs\tand\t\tmore\t",
    "mixed \t \n \t\n  end",
    "x\n\n\n\ny",
    "nbsp\u00a0here and\u3000ideographic space and\u2003em space",
    "zero\u200bwidth\u200cnon\u200djoiner",
    # numbers
    "12345678901234567890",
    "3.14159265358979 and -2.5e-10 and 1,000,000",
    "٠١٢٣٤٥ Arabic-Indic digits and ४२ Devanagari",
    "Call 555-0123 before 9:30pm on 2024-01-15.",
    # URLs and misc
    "https://example.com/path?query=1&other=two#frag",
    "email me at someone@example.org or visit www.test.co.uk",
    "C:\\Users\\name\\file.txt and /usr/local/bin",
    "<html><body class=\"x\">Hi &amp; bye</body></html>",
    "$$\\frac{a}{b} + \\sum_{i=0}^{n} x_i$$",
    # special tokens inside text
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "hello<|endoftext|>world",
    "<|endoftext|><|endoftext|>",
    " <|endoftext|> spaced ",
    "<|im_start|<|im_end|>>",
    "<tool_call>{\"name\": \"f\"}</tool_call>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<|endoftext",
    # edge cases
    "",
    "a",
    "!",
    "\u00ff\u0100\uffff\U0001f600\U0010ffff",
    "\x01 control \x1f chars \x7f",
    "ſ's K'S",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!!!!!!!!!!!!!!!!!!!!!????????????.........,,,,,,,,;;;;;;;;;;;",
    "=" * 300,
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    # long runs: one big pre-tokenizer piece each (regex backtracking, merge heap)
    " " * 2000 + "end",
    "\n" * 500 + "x" + "\t" * 300,
    "!?" * 700,
    "a" * 3000,
    "中" * 800,
]


def random_mixes(seed=1234, count=24):
    """Deterministic random strings mixing the scripts, whitespace kinds and
    special tokens above (a differential check against HF found no
    mismatches over 13000 of these; these few are kept as fixtures)."""
    import random
    rng = random.Random(seed)
    pools = [
        " \t\n\r\x0b\x0c\u00a0\u3000\u2028\u0085\u200b",
        "abcXYZ'sStTrReEvVmMlLdD",
        "0123456789\u0660\u0661\u096a",
        "!?.,;:-_=+*/\\\"'()[]{}<>|@#$%^&~`",
        "你好世界日本語テキスト한국어",
        "مرحباשלוםनमस्ते",
        "éèêëñçÅ\u0301\u0300\u0302\u0308\u0327",
        "😀👍🏽👨\u200d👩\u200d👧🇺🇸🏳️\u200d🌈\ufe0f",
        "ſKΩℌ\u00df\u0130\u0131",
    ]
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "<|fim_pad|>", "<|", "|>"]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.05:
                parts.append(rng.choice(specials))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 5))))
        texts.append("".join(parts))
    return texts


CORPUS += random_mixes()

# Kept smaller for the variants: one of each kind.
VARIANT_CORPUS = [CORPUS[i] for i in (0, 3, 6, 8, 10, 12, 16, 18, 24, 27, 30, 31, 33, 36, 40, 41, 42,
                                      46, 49, 50, 56, 57, 59, 60, 61, 63, 67, 68)]
VARIANT_CORPUS += [
    "a <mask> b <mask>c<mask>  \n d",
    " <mask>",
    "fooqx fooqxd fooqx_bar (fooqx) afooqx fooqx,fooqx\u00e9 \u00e9fooqx",
    unicodedata.normalize("NFD", "xe\u0301y and xéy"),
    "hello<|endoftext|> world <|im_end|>",
]

# GPT-2 byte-level regex pre-tokenizer, as ByteLevel(use_regex=true) applies it.
VARIANTS = [
    {
        "name": "llama3-style",
        "patch": {
            "normalizer": None,
            "model": {"ignore_merges": True},
            "merges_as_strings": True,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex":
                    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
                 "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        },
    },
    {
        "name": "gpt2-style",
        "patch": {
            "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}]},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                              "use_regex": True},
        },
    },
    {
        "name": "nfkc",
        "patch": {"normalizer": {"type": "NFKC"}},
    },
    {
        "name": "nfd-then-nfkd",
        "patch": {"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "NFKD"}]}},
    },
    {
        "name": "added-token-flags",
        "patch": {
            "added_tokens_append": [
                {"id": 151669, "content": "<mask>", "single_word": False, "lstrip": True, "rstrip": True,
                 "normalized": False, "special": True},
                {"id": 151670, "content": "fooqx", "single_word": True, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": False},
                {"id": 151671, "content": "xéy", "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": True, "special": False},
            ],
        },
    },
]


def apply_patch(tj, patch):
    """The same edits the C test makes (tests/test_tokenizer.c apply_patch)."""
    tj = copy.deepcopy(tj)
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        if key in patch:
            tj[key] = patch[key]
    for key, value in patch.get("model", {}).items():
        tj["model"][key] = value
    if patch.get("merges_as_strings"):
        tj["model"]["merges"] = [a + " " + b for a, b in tj["model"]["merges"]]
    tj["added_tokens"] = tj["added_tokens"] + patch.get("added_tokens_append", [])
    return tj


def load_json(path):
    if path.endswith(".zst"):
        raw = subprocess.run(["zstd", "-dc", path], check=True, capture_output=True).stdout
        return json.loads(raw)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def encode_all(tok, texts, with_decoded=False):
    cases = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False).ids
        case = {"text": t, "ids": ids}
        if with_decoded:  # HF's decode, special tokens kept and skipped
            case["decoded"] = tok.decode(ids, skip_special_tokens=False)
            case["decoded_skip_special"] = tok.decode(ids, skip_special_tokens=True)
        cases.append(case)
    return cases


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        ROOT, "tests", "data", "qwen3-tokenizer", "tokenizer.json.zst")
    tj = load_json(src)
    os.makedirs(OUT_DIR, exist_ok=True)

    tok = Tokenizer.from_str(json.dumps(tj))
    cases = encode_all(tok, CORPUS)
    for c in cases:  # the reference round trip the C test also checks
        assert tok.decode(c["ids"], skip_special_tokens=False) == unicodedata.normalize("NFC", c["text"]), c
    with open(os.path.join(OUT_DIR, "qwen3.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=0)
        f.write("\n")

    variants = []
    for v in VARIANTS:
        vt = Tokenizer.from_str(json.dumps(apply_patch(tj, v["patch"])))
        for t in v["patch"].get("added_tokens_append", []):
            assert vt.token_to_id(t["content"]) == t["id"], t
        variants.append({"name": v["name"], "patch": v["patch"], "cases": encode_all(vt, VARIANT_CORPUS, True)})
    with open(os.path.join(OUT_DIR, "variants.json"), "w", encoding="utf-8") as f:
        json.dump(variants, f, ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"wrote {len(cases)} qwen3 cases and {len(variants)} variants "
          f"({sum(len(v['cases']) for v in variants)} cases) to {OUT_DIR}")


if __name__ == "__main__":
    main()
