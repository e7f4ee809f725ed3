"""The canonical raw tables every source produces (movielens, tables, synthetic), and the readable
user-profile columns the default text template uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import ray

# ML-1M README codes, used for the user profile sentence.
ML1M_AGES = {1: "under-18", 18: "18-24-year-old", 25: "25-34-year-old", 35: "35-44-year-old",
             45: "45-49-year-old", 50: "50-55-year-old", 56: "56-or-older"}
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
]


@dataclass
class RawTables:
    interactions: ray.data.Dataset
    users: pa.Table | None
    items: pa.Table | None
    # name -> where it came from, for error messages and fingerprints
    origins: dict[str, str] = field(default_factory=dict)
    # files whose (path, size, mtime) make up the input fingerprint
    files: list[str] = field(default_factory=list)
    # interaction columns when known without running the dataset (else read from its schema)
    columns: list[str] | None = None

    def interaction_columns(self) -> list[str] | None:
        return self.columns if self.columns is not None else self.interactions.columns()


def add_profile_text_columns(users: pa.Table, ml1m_codes: bool) -> pa.Table:
    """Readable columns for the user profile sentence (age_text, gender_text, occupation_text)."""
    ages = users.column("age").to_pylist()
    occ = users.column("occupation").to_pylist()
    if ml1m_codes:
        age_text = [ML1M_AGES.get(int(a), f"{a}-year-old") if a is not None else "" for a in ages]
        occ_text = [ML1M_OCCUPATIONS[int(o)] if o is not None and 0 <= int(o) < len(ML1M_OCCUPATIONS) else "unknown"
                    for o in occ]
    else:
        age_text = [f"{a}-year-old" if a is not None else "" for a in ages]
        occ_text = [str(o) if o is not None else "unknown" for o in occ]
    gender = {"M": "man", "F": "woman"}
    g_text = [gender.get(g, "person") for g in users.column("gender").to_pylist()]
    return (users.append_column("age_text", pa.array(age_text, pa.string()))
            .append_column("gender_text", pa.array(g_text, pa.string()))
            .append_column("occupation_text", pa.array(occ_text, pa.string())))
