"""Select: which series of a study feeds which image modality of the served network.

Regular expressions on SeriesDescription, then ProtocolName (:data:`DEFAULT_RULES`, overridable per
modality); localizers and derived series are excluded by ImageType or description.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from cmml_monai.deploy.study.scan import SeriesInfo, Study

__all__ = [
    "DEFAULT_RULES",
    "MODALITY_ALIASES",
    "EXCLUDED_IMAGE_TYPES",
    "EXCLUDED_DESCRIPTION",
    "SeriesRules",
]

logger = logging.getLogger(__name__)

_B, _E = r"(?<![a-z0-9])", r"(?![a-z0-9])"  # token edges: "t1_post" and "T1 post" both split at "_"/" "
_CONTRAST = rf"({_B}(post|contrast|gad|gado|gd|ce|km|mdc){_E}|\+ ?c{_E}|\+ ?gd)"
#: per sequence: regexes tried in this order (case-insensitive) on SeriesDescription then ProtocolName,
#: and regexes that disqualify a series for it. The first regex that matches a series wins.
DEFAULT_RULES: dict[str, dict[str, list[str]]] = {
    "T1c": {
        "match": [
            rf"{_B}t1[ _-]?(c|ce|gd|km){_E}",
            rf"{_B}t1.*{_CONTRAST}",
            rf"{_CONTRAST}.*{_B}t1",
            rf"{_B}(mprage|spgr|bravo|vibe).*{_CONTRAST}",
        ],
        "exclude": [r"flair"],
    },
    "T1": {
        "match": [rf"{_B}t1[ _-]?(n|w|weighted|native|pre)?{_E}", rf"{_B}t1", rf"{_B}(mprage|spgr|bravo){_E}"],
        "exclude": [_CONTRAST, r"flair", rf"{_B}t1[ _-]?c{_E}"],
    },
    "T2": {
        "match": [rf"{_B}t2[ _-]?(w|weighted|tse|fse|space)?{_E}", rf"{_B}t2"],
        "exclude": [
            r"flair",
            r"dark[ _-]?fluid",
            rf"{_B}t2[ _-]?(f|\*|star){_E}",
            r"t2\*",
            rf"{_B}(swi|gre|haste){_E}",
        ],
    },
    "FLAIR": {
        "match": [r"flair", rf"{_B}t2[ _-]?f{_E}", r"dark[ _-]?fluid"],
        "exclude": [],
    },
}
#: model modality name (lower case) -> sequence of :data:`DEFAULT_RULES` (MEN/BraTS names included)
MODALITY_ALIASES = {
    "t1c": "T1c",
    "t1ce": "T1c",
    "t1gd": "T1c",
    "t1": "T1",
    "t1n": "T1",
    "t1w": "T1",
    "t2": "T2",
    "t2w": "T2",
    "flair": "FLAIR",
    "t2f": "FLAIR",
}
#: a series whose ImageType holds one of these is never a model input: scouts, reformats, projections
EXCLUDED_IMAGE_TYPES = ("LOCALIZER", "DERIVED", "SECONDARY", "PROJECTION IMAGE")
#: a series whose description or protocol matches this is never a model input (scanners that do not mark
#: localizers in ImageType)
EXCLUDED_DESCRIPTION = r"locali[sz]er|scout|survey|3[ -]?plane|pilot|calibration"


class SeriesRules:
    """Which series of a study is which model modality.

    Args:
        rules: model modality name -> ``{"match": [regex, ...], "exclude": [regex, ...]}``, or a sequence
            name of :data:`DEFAULT_RULES` (``"T1c"``, ``"T1"``, ``"T2"``, ``"FLAIR"``). Regexes are
            case-insensitive and searched in SeriesDescription, then ProtocolName. Modalities not given use
            the defaults of their alias (:data:`MODALITY_ALIASES`: ``t1c``, ``t1n``/``t1``,
            ``t2w``/``t2``, ``t2f``/``flair``).
        excluded_image_types: ImageType values that exclude a series (localizers, reformats).
        excluded_description: regex excluding a series by description or protocol.
        modalities: DICOM Modality values accepted (``None``: any).

    Selection, per model modality in the network's order: the series not excluded, not taken by an
    earlier modality, not matching an ``exclude`` regex; the first ``match`` regex that matches any of them
    decides; among the series it matches, the lowest SeriesNumber wins (then the SeriesInstanceUID).

    Raises:
        ValueError: a modality without rule and without alias, or a regex that does not compile.

    Example:
        >>> rules = SeriesRules({"t2f": {"match": ["dark fluid"]}})
        >>> rules.rule_for("t1c")["match"][0].startswith("(?<!")
        True
    """

    def __init__(
        self,
        rules: Mapping[str, Mapping[str, Sequence[str]] | str] | None = None,
        excluded_image_types: Sequence[str] = EXCLUDED_IMAGE_TYPES,
        excluded_description: str | None = EXCLUDED_DESCRIPTION,
        modalities: Sequence[str] | None = ("MR",),
    ) -> None:
        self.rules: dict[str, dict[str, list[str]]] = {}
        for name, rule in (rules or {}).items():
            if isinstance(rule, str):
                if rule not in DEFAULT_RULES:
                    raise ValueError(f"series rule {name!r}: {rule!r} is not one of {sorted(DEFAULT_RULES)}")
                rule = DEFAULT_RULES[rule]
            if not isinstance(rule, Mapping) or not rule.get("match"):
                raise ValueError(f"series rule {name!r} must have a non-empty 'match' list, got {rule!r}")
            self.rules[str(name)] = {
                "match": [str(r) for r in rule["match"]],
                "exclude": [str(r) for r in rule.get("exclude", [])],
            }
        for name, rule in self.rules.items():
            for regex in [*rule["match"], *rule["exclude"]]:
                try:
                    re.compile(regex)
                except re.error as e:
                    raise ValueError(f"series rule {name!r}: regex {regex!r} does not compile ({e})") from e
        self.excluded_image_types = tuple(str(t).upper() for t in excluded_image_types)
        self.excluded_description = excluded_description
        self.modalities = None if modalities is None else tuple(str(m).upper() for m in modalities)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SeriesRules:
        """From ``{"rules": {...}, "excluded_image_types": [...], "excluded_description": ..., "modalities": [...]}``
        (every key optional), e.g. a ``--rules`` file."""
        known = {"rules", "excluded_image_types", "excluded_description", "modalities"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"series rules: unknown keys {unknown}; use {sorted(known)}")
        return cls(**dict(data))

    def rule_for(self, modality: str) -> dict[str, list[str]]:
        """The rule of a model modality (its own, or the default of its alias)."""
        if modality in self.rules:
            return self.rules[modality]
        alias = MODALITY_ALIASES.get(modality.lower())
        if alias is None:
            raise ValueError(
                f"no series rule for modality {modality!r} and no default (defaults: {sorted(MODALITY_ALIASES)}); "
                "give one in the series rules"
            )
        return DEFAULT_RULES[alias]

    def excluded(self, series: SeriesInfo) -> str | None:
        """Why ``series`` can never be a model input (None when it can)."""
        if self.modalities is not None and series.modality.upper() not in self.modalities:
            return f"Modality {series.modality or '?'} is not {'/'.join(self.modalities)}"
        bad = [t for t in series.image_type if t in self.excluded_image_types]
        if bad:
            return f"ImageType {'/'.join(bad)}"
        text = f"{series.description}\n{series.protocol}"
        if self.excluded_description and re.search(self.excluded_description, text, re.IGNORECASE):
            return "a localizer by its description"
        return None

    def select(self, study: Study, modalities: Sequence[str], case: str = "case") -> dict[str, SeriesInfo | None]:
        """Model modality -> its series in ``study`` (None when no series matches: the modality is missing).

        Logged: each excluded series that a rule would have matched (once), each missing modality (once).
        """
        taken: set[str] = set()
        out: dict[str, SeriesInfo | None] = {}
        reported: set[str] = set()
        for modality in modalities:
            rule = self.rule_for(modality)
            chosen = None
            for regex in rule["match"]:
                hits = []
                for s in study.series:
                    if s.uid in taken:
                        continue
                    text = f"{s.description}\n{s.protocol}"
                    if not re.search(regex, text, re.IGNORECASE):
                        continue
                    if any(re.search(x, text, re.IGNORECASE) for x in rule["exclude"]):
                        continue
                    why = self.excluded(s)
                    if why is not None:
                        if s.uid not in reported:
                            reported.add(s.uid)
                            logger.info("%s: %s excluded for %s: %s", case, s.label(), modality, why)
                        continue
                    hits.append(s)
                if hits:
                    chosen = hits[0]  # study.series is ordered by SeriesNumber, then UID
                    break
            out[modality] = chosen
            if chosen is None:
                logger.warning("%s: no series matches %s; it is missing", case, modality)
            else:
                taken.add(chosen.uid)
                logger.info("%s: %s <- %s", case, modality, chosen.label())
        return out
