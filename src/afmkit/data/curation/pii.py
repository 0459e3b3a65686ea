"""PII scrubbing: a transform that replaces personal data with placeholder tags, counted by kind.

What is replaced (in this order, so a longer pattern wins over a shorter one inside it):

- ``<EMAIL>``: ``local@domain.tld`` addresses;
- ``<CREDIT_CARD>``: 13 to 19 digits, optionally grouped by single spaces or dashes, that pass the
  Luhn checksum (a random 16-digit number fails it 90% of the time, so most IDs are left alone);
- ``<SSN>``: US social-security numbers written ``AAA-GG-SSSS``, without the never-issued
  areas 000, 666 and 900-999, group 00 or serial 0000 (bare 9-digit runs are too ambiguous);
- ``<PHONE>``: North-American numbers with separators (``555-123-4567``, ``(555) 123-4567``,
  ``+1 555.123.4567``) and international numbers written with a ``+`` country code and 10 to 15
  digits in groups (``+44 20 7946 0958``);
- ``<IP_ADDRESS>``: dotted IPv4 addresses, only when asked (``ipv4=True``): code and docs are
  full of example addresses such as 127.0.0.1.

Version strings (3.12.1), dates (2024-01-15) and plain numbers are not matched: every pattern
needs its own separators and digit counts and must not touch a neighbouring digit or word.
"""

from __future__ import annotations

import re
from collections import Counter

from afmkit.data.corpus import Document

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?!\w|\.\d)")
SSN = re.compile(r"(?<![\w.-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?!\w|\.\d)")
PHONE = re.compile(
    r"(?<![\w.+-])(?:"
    r"(?:\+?1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # North American
    r"|\+\d{1,3}(?:[ .-]\(?\d{1,4}\)?){2,5}"  # international, checked for 10-15 digits below
    r")(?![\w-]|\.\d)"
)
IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)"
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment cards: doubling every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match) -> bool:
    text = match.group()
    digits = re.sub(r"\D", "", text)
    # One separator style at most (4-4-4-4 or 4-6-5 groups, or none), so lists of numbers don't join.
    return 13 <= len(digits) <= 19 and len(set(re.findall(r"[ -]", text))) <= 1 and luhn_valid(digits)


def _phone(match: re.Match) -> bool:
    return 10 <= len(re.sub(r"\D", "", match.group())) <= 15 if match.group().startswith("+") else True


class PiiScrubber:
    """Replace emails, card numbers, SSNs, phone numbers (and optionally IPv4) with tags."""

    name = "pii"

    def __init__(self, *, ipv4: bool = False) -> None:
        self.rules: list[tuple[str, re.Pattern, object]] = [
            ("EMAIL", EMAIL, None),
            ("CREDIT_CARD", CARD, _card),
            ("SSN", SSN, None),
            ("PHONE", PHONE, _phone),
        ]
        if ipv4:
            self.rules.append(("IP_ADDRESS", IPV4, None))
        self.replacements: Counter[str] = Counter()

    def scrub(self, text: str) -> tuple[str, Counter[str]]:
        counts: Counter[str] = Counter()
        for tag, pattern, accept in self.rules:

            def replace(match: re.Match, tag=tag, accept=accept) -> str:
                if accept is not None and not accept(match):
                    return match.group()
                counts[tag] += 1
                return f"<{tag}>"

            text = pattern.sub(replace, text)
        return text, counts

    def process(self, document: Document) -> Document:
        text, counts = self.scrub(document.text)
        if not counts:
            return document
        self.replacements.update(counts)
        return Document(text, document.source)
