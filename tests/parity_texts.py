"""200+ varied texts for golden parity tests: short, unicode, one-token, whitespace-ish, over-long."""

from __future__ import annotations


def parity_texts() -> list[str]:
    base = [
        "hello world",
        "I",
        ".",
        " ",
        "\n\t ",
        "a",
        "OK",
        "😀",
        "ñ",
        "日本語",
        "Ünïcödé façade naïve café",
        "Привет, как дела?",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "你好，世界",
        "안녕하세요",
        "The quick brown fox jumps over the lazy dog.",
        "geladeira frost free 375 litros",
        "Embeddings turn text into vectors.",
        "   leading and trailing spaces   ",
        "MiXeD CaSe TeXt",
        "numbers 1234567890 and symbols !@#$%^&*()",
        "email@example.com https://example.org/path?q=1",
        "tab\tseparated\tvalues",
        "line one\nline two\nline three",
        "a" * 300,
        "word " * 400,
        "supercalifragilisticexpialidocious " * 50,
        "🙂" * 200,
        "x",
    ]
    topics = [
        "search",
        "databases",
        "cooking",
        "football",
        "astronomy",
        "music",
        "law",
        "medicine",
        "travel",
        "finance",
        "gardening",
        "chess",
        "weather",
        "history",
        "poetry",
        "physics",
        "biology",
        "art",
    ]
    templates = [
        "What is the best way to learn {t}?",
        "A short note on {t}.",
        "{t} is a topic many people enjoy discussing at length with friends and colleagues alike.",
        "In this long document we describe {t} in great detail. " * 12,
        "{t}",
        "Why does {t} matter so much in 2026, and what will change next year?",
        "Top 10 facts about {t} you did not know",
        "¿Qué opinas sobre {t}?",
        "Le sujet du jour: {t}.",
        "{T} {T} {T}",
    ]
    for t in topics:
        for tpl in templates:
            base.append(tpl.format(t=t, T=t.upper()))
    return base
