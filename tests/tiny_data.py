"""A hand-made dataset small enough to check fused rows exactly."""

from pathlib import Path

USERS = """user_id,age,gender,occupation,zip
u1,25,F,12,10001
u2,18,M,4,20002
u3,45,M,7,30003
"""
ITEMS = """item_id,title,year,genres
i1,Alpha,1999,Drama|Romance
i2,Beta,2001,Comedy
i3,Gamma,1987,Action|Sci-Fi
"""
# 2001-09-09 01:46:40 UTC is 1000000000 (a Sunday: weekday 6)
INTERACTIONS = """user_id,item_id,rating,timestamp
u1,i1,5,1000000000
u1,i2,2,1000003600
u2,i3,4,1000007200
u3,i1,3,1000010800
u3,i3,1,1000014400
u2,i2,5,1000018000
"""


def write(folder: Path, users=USERS, items=ITEMS, interactions=INTERACTIONS, encoding="utf-8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("users.csv", users), ("items.csv", items), ("interactions.csv", interactions)):
        data = text if isinstance(text, bytes) else text.encode(encoding)
        (folder / name).write_bytes(data)
    return folder


def config(folder: Path, run_dir: Path, **prepare) -> dict:
    prep = {
        "scenario": {"column": "age", "groups": {"young": [18], "mid": [25], "old": [45]}},
        "categorical": [{"name": n} for n in ("user_id", "item_id", "gender", "first_genre", "age")],
        "numeric": ["year"],
        "context": ["hour", "weekday"],
        "text": {"item": "{title} ({year}): {genres}", "user": "{gender} aged {age}"},
        "split": {"kind": "random", "ratios": [1.0, 0.0, 0.0]},
    }
    prep.update(prepare)
    return {
        "name": "tiny",
        "run_dir": str(run_dir),
        "data": {
            "source": "tables",
            "interactions": {"path": str(folder / "interactions.csv"), "format": "csv"},
            "users": {"path": str(folder / "users.csv"), "format": "csv"},
            "items": {"path": str(folder / "items.csv"), "format": "csv"},
        },
        "prepare": prep,
    }
