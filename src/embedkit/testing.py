"""Tiny random models for fast tests (yours and ours): no download, built in well under a second.

>>> import tempfile
>>> from embedkit.testing import build_tiny_bert
>>> path = build_tiny_bert(tempfile.mkdtemp())
>>> from embedkit import Embedder
>>> Embedder(str(path)).encode(["hello world"]).shape
(1, 32)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_WORDS = (
    "the a an and or of to in on at for with is are was be it this that cat dog sat mat park hello "
    "world embed vector text model search query document fast slow red blue green big small run runs "
    "running house car tree water fire sun moon star book read write python data file job server "
    "client cloud"
).split()


def _vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-:;()")
    pieces = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return specials + chars + pieces + _WORDS


def build_tiny_bert(
    out_dir: str | Path,
    *,
    layout: str = "sentence-transformers",
    hidden_size: int = 32,
    max_seq_length: int = 32,
    pooling: str = "mean",
    normalize: bool = True,
    seed: int = 0,
    prompts: dict[str, str] | None = None,
    arch: str = "bert",
) -> Path:
    """Write a random encoder (2 layers) with a real WordPiece tokenizer to ``out_dir``.

    ``layout`` is ``sentence-transformers`` (modules.json, pooling config) or ``hf`` (plain
    transformers directory). ``arch`` is ``bert``, ``xlm-roberta`` (BGE-M3's family: ``<s>``/``</s>``
    special tokens, padding id 1, positions offset past it) or ``mpnet``. Returns the directory.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if arch == "bert":
        vocab_size = _save_wordpiece_tokenizer(out)
    elif arch in ("xlm-roberta", "mpnet"):
        vocab_size = _save_roberta_style_tokenizer(out)
    else:
        raise ValueError(f"arch must be 'bert', 'xlm-roberta' or 'mpnet', got {arch!r}")
    torch.manual_seed(seed)
    _build_encoder(arch, vocab_size, hidden_size, max_seq_length).eval().save_pretrained(str(out))
    if layout == "sentence-transformers":
        _write_sentence_transformers_layout(out, hidden_size, max_seq_length, pooling, normalize, prompts)
    elif layout != "hf":
        raise ValueError(f"layout must be 'sentence-transformers' or 'hf', got {layout!r}")
    return out


def _write_sentence_transformers_layout(
    out: Path, hidden_size: int, max_seq_length: int, pooling: str, normalize: bool, prompts: dict | None
) -> None:
    """modules.json (the Transformer at the root, Pooling, Normalize when asked), the pooling config,
    sentence_bert_config.json and config_sentence_transformers.json."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    (out / "1_Pooling").mkdir(exist_ok=True)
    flags = {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": pooling == "mean_sqrt_len",
    }
    (out / "1_Pooling" / "config.json").write_text(json.dumps(flags, indent=2))
    (out / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": prompts or {}, "default_prompt_name": None})
    )


def _save_wordpiece_tokenizer(out: Path) -> int:
    """BERT's tokenizer over the tiny vocabulary; returns the vocabulary size."""
    from transformers import BertTokenizerFast

    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(_vocab()) + "\n", encoding="utf-8")
    # Build the WordPiece tokenizer with the tokenizers library itself: transformers 5's
    # BertTokenizerFast(vocab_file=...) ignores the vocabulary and maps every word to [UNK].
    from tokenizers import BertWordPieceTokenizer

    backend = BertWordPieceTokenizer(str(vocab_file), lowercase=True)
    tokenizer = BertTokenizerFast(tokenizer_object=backend._tokenizer, model_max_length=512)
    tokenizer.save_pretrained(str(out))
    return len(_vocab())


def _save_roberta_style_tokenizer(out: Path) -> int:
    """The tiny vocabulary with RoBERTa's special tokens (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2) and
    ``<s> text </s>`` framing; returns the vocabulary size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    words = specials + _vocab()[5:]
    backend = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=512,
    )
    tokenizer.save_pretrained(str(out))
    return len(words)


def _build_encoder(arch: str, vocab_size: int, hidden_size: int, max_seq_length: int, **config):
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": hidden_size * 2,
        **config,
    }
    if arch == "bert":
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(max_position_embeddings=max(64, max_seq_length), **common))
    # RoBERTa-style: <s> 0, <pad> 1, </s> 2, positions offset past the padding id
    from transformers import MPNetConfig, MPNetModel, XLMRobertaConfig, XLMRobertaModel

    config_cls, model_cls = (
        (XLMRobertaConfig, XLMRobertaModel) if arch == "xlm-roberta" else (MPNetConfig, MPNetModel)
    )
    config = config_cls(
        max_position_embeddings=max(64, max_seq_length) + 2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        **common,
    )
    return model_cls(config, add_pooling_layer=False)


_CLIP_WORDS = (
    "a photo of the cat dog red blue green car tree house sun moon on in and with small big picture "
    "image drawing"
).split()


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2 / CLIP ``bytes_to_unicode``)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP BPE vocabulary: every byte (alone and word-final), merges that build a few whole
    words, and the two special tokens, so any text tokenises."""
    vocab: dict[str, int] = {}
    for sym in _byte_symbols():
        vocab[sym] = len(vocab)
    for sym in _byte_symbols():
        vocab[sym + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _CLIP_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: w o r d</w> -> wo r d</w> -> wor d</w> -> word</w>
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def build_tiny_clip(
    out_dir: str | Path,
    *,
    hidden_size: int = 32,
    projection_dim: int = 16,
    image_size: int = 32,
    patch_size: int = 8,
    max_seq_length: int = 24,
    seed: int = 0,
    vision: dict | None = None,
) -> Path:
    """Write a random tiny CLIP model (2-layer text and vision towers) with a real CLIP BPE tokenizer
    (vocab.json + merges.txt written here, no download) and a CLIP image processor configuration
    (``preprocessor_config.json``: resize the short side to ``image_size``, center crop, normalise) to
    ``out_dir``. ``vision`` overrides the vision tower's config (e.g. ViT-B/32's sizes, for a
    benchmark whose speed should be realistic; the weights stay random). Returns the directory.

    >>> import tempfile
    >>> from embedkit.engine.image import ImageEmbedder
    >>> emb = ImageEmbedder(str(build_tiny_clip(tempfile.mkdtemp())), device="cpu")
    >>> emb.encode(["a photo of a cat"]).shape
    (1, 16)
    """
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from embedkit.models.text import quiet_transformers

    quiet_transformers()  # no progress bars from save_pretrained
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_seq_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    tokenizer.save_pretrained(str(out))  # adds tokenizer.json (the fast tokenizer) beside
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": image_size},
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": image_size, "width": image_size},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "do_convert_rgb": True,
            },
            indent=2,
        )
    )
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": max_seq_length,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
            **(vision or {}),
        },
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(str(out))
    return out


# Letters beyond ASCII the BGE-M3 stand-in's tokenizer knows (its training text is English), so some
# non-English input becomes real pieces; characters outside this and the training text (emoji, most
# scripts) become <unk>, which BGE-M3's sparse output leaves out.
_M3_EXTRA_ALPHABET = "àáâäçèéêëíîïñóôöøúûüßæœ" + "абвгдеёжзийклмнопрстуфхцчшщъыьэюя" + "日本語你好世界中文"
_M3_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3 as in XLM-R; <mask> is the last id


def build_tiny_bge_m3(
    out_dir: str | Path,
    *,
    hidden_size: int = 32,
    vocab_size: int = 3000,
    seed: int = 0,
    embedding_rows: int | None = None,
    **encoder: Any,
) -> Path:
    """Write a random stand-in for BAAI/bge-m3 to ``out_dir``: the same layout and tokenizer framing
    at toy size, for parity tests of its three outputs (dense, sparse lexical weights, ColBERT).

    - an XLMRobertaModel (2 layers, 2 heads, ``hidden_size``, 8194 positions: 8192 tokens, pad id 1);
    - a Unigram tokenizer trained here (``tokenizers``) on Python's own documentation, with XLM-R's
      specials (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` last), ``<s> text </s>``
      framing, ``tokenizer_class`` XLMRobertaTokenizer and model_max_length 8192, loadable by
      transformers 4.x and 5.x alike (see ``_save_m3_tokenizer``);
    - the sentence-transformers files of bge-m3 (Transformer at the root, CLS pooling, Normalize,
      max_seq_length 8192);
    - BGE-M3's heads beside them: ``sparse_linear.pt`` (``torch.nn.Linear(hidden, 1)``'s state_dict)
      and ``colbert_linear.pt`` (``torch.nn.Linear(hidden, hidden)``'s), random from ``seed``.

    ``vocab_size`` is the tokenizer's (it learns at most what the corpus holds, ~13k);
    ``embedding_rows`` gives the model more rows than that (``make bench`` builds BGE-M3's 250,002
    with 6 layers at hidden size 384: ``encoder`` overrides the XLM-R config). Returns the
    directory. Takes a few seconds (the tokenizer's training).
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = _save_m3_tokenizer(out, vocab_size)
    torch.manual_seed(seed)
    # Weights 10x the usual initial scale: at 0.02 a random encoder's attention is near uniform and
    # every text's CLS vector the same to ~1e-4, too alike for a parity test to tell texts apart.
    rows = max(n_vocab, embedding_rows or 0)
    encoder = _build_encoder("xlm-roberta", rows, hidden_size, 8192, **{"initializer_range": 0.2, **encoder})
    encoder.eval().save_pretrained(str(out))
    _write_sentence_transformers_layout(out, hidden_size, 8192, "cls", True, None)
    return add_m3_heads(out, seed=seed + 1)


def add_m3_heads(model_dir: str | Path, *, colbert_dim: int | None = None, seed: int = 1) -> Path:
    """Write BGE-M3's heads beside the encoder in ``model_dir`` (e.g. a :func:`build_tiny_bert` with
    ``arch="xlm-roberta"``), random from ``seed``: ``sparse_linear.pt`` (``torch.nn.Linear(hidden, 1)``'s
    state_dict) and ``colbert_linear.pt`` (``Linear(hidden, colbert_dim or hidden)``'s). Returns the
    directory."""
    import torch

    out = Path(model_dir)
    hidden = json.loads((out / "config.json").read_text())["hidden_size"]
    torch.manual_seed(seed)
    torch.save(torch.nn.Linear(hidden, 1).state_dict(), out / "sparse_linear.pt")
    torch.save(torch.nn.Linear(hidden, colbert_dim or hidden).state_dict(), out / "colbert_linear.pt")
    return out


def _save_m3_tokenizer(out: Path, vocab_size: int) -> int:
    """Train XLM-R's kind of tokenizer (SentencePiece Unigram over ``▁``-marked words) on ~200 kB of
    Python's language reference (embedkit.corpus), write tokenizer.json, tokenizer_config.json and
    special_tokens_map.json, and return the vocabulary size (``<mask>`` included).

    The pipeline is the one transformers 5's XLMRobertaTokenizer rebuilds from a tokenizer.json (it
    keeps the file's vocabulary but sets its own pre-tokenizer and post-processor, and no normaliser
    other than a SentencePiece charsmap, which a tokenizer trained here has none of), so transformers
    5 and 4.x (which uses the file as written) split every text alike. Written by hand, not through a
    transformers class, so the files do not depend on the transformers version that writes them.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from embedkit.corpus import doc_passages

    # ~200 kB of the language reference: enough for a vocabulary of a few thousand; trains in ~2 s
    texts = doc_passages(limit=80)

    def pre_tokenizer():
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            ]
        )

    trainer_tok = Tokenizer(models.Unigram())
    trainer_tok.pre_tokenizer = pre_tokenizer()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - 1,  # <mask> comes after
        special_tokens=list(_M3_SPECIALS),
        unk_token="<unk>",
        initial_alphabet=list(_M3_EXTRA_ALPHABET),
        show_progress=False,
    )
    trainer_tok.train_from_iterator(texts, trainer)
    vocab = [(piece, score) for piece, score in json.loads(trainer_tok.to_str())["model"]["vocab"]]
    assert [p for p, _ in vocab[:4]] == list(_M3_SPECIALS), vocab[:4]
    vocab.append(("<mask>", 0.0))
    mask_id = len(vocab) - 1

    backend = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizer()
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    backend.add_special_tokens(list(_M3_SPECIALS))
    backend.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    assert backend.token_to_id("<mask>") == mask_id
    backend.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "XLMRobertaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": True,
        "added_tokens_decoder": {
            str(i): {
                "content": tok,
                "lstrip": tok == "<mask>",
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, tok in [*enumerate(_M3_SPECIALS), (mask_id, "<mask>")]
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "cls_token", "sep_token", "pad_token")}
    special.update(unk_token="<unk>", mask_token="<mask>")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return len(vocab)
