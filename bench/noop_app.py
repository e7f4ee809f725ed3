"""The framework's ceiling for bench/serve_bench.py: the real Serve app's topology (the same
FastAPI ingress deployment, a model deployment with the same @serve.batch settings and limits) and
the same request and response shapes, but a model that does no work (a canned answer)."""

from __future__ import annotations

from ray import serve

from serve_apps.recommender import RecommenderAPI

ITEMS = [{"item_id": f"item{i}", "title": f"Item {i}", "score": round(1 - i / 100, 6)} for i in range(100)]


@serve.deployment(name="RecommenderModel", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  max_queued_requests=256)
class NoopModel:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002, max_concurrent_batches=2)
    async def _recommend_batch(self, queries: list[dict]) -> list[dict]:
        return [{"user_id": q["user_id"], "scenario": q["scenario"], "items": ITEMS[:q["k"]], "model_version": "noop",
                 "excluded_seen": 0, "cold_start": False, "retrieval": "index", "candidates": 500,
                 "timings_ms": {"retrieve": 0.0, "rank": 0.0, "select": 0.0}} for q in queries]

    async def recommend(self, query: dict) -> dict:
        return await self._recommend_batch(query)

    def info(self) -> dict:
        return {"version": "noop"}


def build_noop_app(scenarios: list[str]):
    return RecommenderAPI.bind(NoopModel.bind(), scenarios)
