"""The same scoring function behind a bare FastAPI + uvicorn app (no Ray Serve): the baseline of
bench/serve_bench.py. One process, requests scored one at a time in FastAPI's thread pool.

  MCL_RAY_ARTIFACT=runs/ml1m_swr/artifact uvicorn bench.bare_app:app --port 8100
"""

import os

from fastapi import FastAPI, HTTPException

from mcl_ray.serve.api import RecommendRequest
from mcl_ray.serve.recommender import Query, Recommender, RequestError

app = FastAPI()
rec = Recommender(os.environ["MCL_RAY_ARTIFACT"])


@app.post("/v1/recommend")
def recommend(req: RecommendRequest) -> dict:
    out = rec.recommend_many([Query(**req.model_dump())])[0]
    if isinstance(out, RequestError):
        raise HTTPException(out.status, str(out))
    return out
