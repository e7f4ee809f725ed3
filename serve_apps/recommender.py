"""Ray Serve app: a FastAPI ingress in front of an autoscaled model deployment.

    serve run serve_apps.recommender:build_app artifact=runs/ml1m_swr/artifact
    serve deploy serve_apps/recommender.yaml          # autoscaling, limits, health checks
    mcl-ray serve runs/ml1m_swr/artifact             # the same, from the CLI

Endpoints (OpenAPI at /docs and /openapi.json): POST /v1/recommend, POST /v1/score,
POST /v1/explain, GET /v1/model, GET /healthz. Bad input is a 4xx (422 schema/unknown scenario, 404 unknown
user/item, 413 body too large); overload of the model deployment is a 503 with Retry-After.
A new artifact rolls out in place through `user_config: {artifact: ...}` (reconfigure), so
requests in flight finish on the old model and none is dropped.
"""


import asyncio
import logging
from typing import Optional

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from mcl_ray.serve.api import (MAX_BODY_BYTES, ErrorResponse, ExplainRequest, ExplainResponse, RecommendRequest,
                               RecommendResponse, ScoreRequest, ScoreResponse)

log = logging.getLogger("mcl_ray.serve")
RETRY_AFTER_S = 1

api = FastAPI(
    title="mcl-ray recommender",
    version="1",
    description="Multi-scenario recommendations from an mcl-ray model artifact.",
)

ERRORS = {404: {"model": ErrorResponse, "description": "unknown user (without profile) or item"},
          413: {"model": ErrorResponse, "description": "request body too large"},
          422: {"description": "invalid request: schema, bounds, unknown scenario or field"},
          503: {"model": ErrorResponse, "description": "overloaded: retry after the Retry-After seconds"}}


@api.middleware("http")
async def limit_body_size(request: Request, call_next):
    """413 before parsing: a declared or actual body over MAX_BODY_BYTES is never read whole."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
    if declared is None and request.method == "POST":  # chunked: Starlette replays the read body downstream
        if len(await request.body()) > MAX_BODY_BYTES:
            return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
    return await call_next(request)


def _one_thread(fn, *args):
    """torch's thread count is per OS thread: pin each worker thread to one."""
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return fn(*args)


@serve.deployment(
    name="RecommenderModel",
    ray_actor_options={"num_cpus": 1},
    # Requests beyond max_ongoing wait in the caller's router with backoff, which collapsed
    # throughput under load here (30 req/s at 32 in flight with 16, 70 with 64): admit them
    # into the replica, where @serve.batch queues them cheaply.
    max_ongoing_requests=64,
    max_queued_requests=256,  # beyond this the ingress answers 503 + Retry-After
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class RecommenderModel:
    # The artifact comes in user_config (Serve calls reconfigure before the replica takes traffic):
    # a new artifact is then a config-only change that updates live replicas in place.
    def __init__(self, batch_max_size: int = 8, batch_wait_ms: float = 2.0):
        self._rec = None
        self._artifact = None
        self._explainer = None  # (Recommender, Explainer) and the sentence writer: built on first use
        self._writer = None
        self._recommend_batch.set_max_batch_size(batch_max_size)
        self._recommend_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    def reconfigure(self, user_config: dict) -> None:
        """Roll out another artifact: load it fully, then swap (requests in flight keep the old one)."""
        from mcl_ray.serve.recommender import Recommender

        path = (user_config or {}).get("artifact")
        if path and path != self._artifact:
            rec = Recommender(path)
            self._rec, self._artifact = rec, path
            log.info("serving artifact %s (%s)", path, rec.version)

    def check_health(self) -> None:
        if self._rec is None:
            raise RuntimeError("no model loaded: set user_config.artifact")

    # Two batches at once, each scored in its own thread with one torch thread: a batch's cost is
    # linear in its rows (no amortisation on CPU), so parallel batches use the cores instead.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002, max_concurrent_batches=2)
    async def _recommend_batch(self, queries: list[dict]) -> list[dict]:
        from mcl_ray.serve.recommender import Query, RequestError

        rec = self._rec  # one model for the whole batch, even during a rollout
        out = await asyncio.to_thread(_one_thread, rec.recommend_many, [Query(**q) for q in queries])
        return [{"error": r.status, "detail": str(r)} if isinstance(r, RequestError) else r for r in out]

    async def recommend(self, query: dict) -> dict:
        return await self._recommend_batch(query)

    async def score(self, query: dict) -> dict:
        from mcl_ray.serve.recommender import Query, RequestError

        try:
            return await asyncio.to_thread(_one_thread, self._rec.score, Query(**query))
        except RequestError as e:
            return {"error": e.status, "detail": str(e)}

    async def explain(self, query: dict) -> dict:
        from mcl_ray.serve.recommender import RequestError

        try:
            return await asyncio.to_thread(_one_thread, self._explain, query)
        except RequestError as e:
            return {"error": e.status, "detail": str(e)}

    def _explain(self, query: dict) -> dict:
        from mcl_ray.serve.explain import Explainer, ExplainQuery

        rec = self._rec
        if self._explainer is None or self._explainer[0] is not rec:
            self._explainer = (rec, Explainer(rec))
        out = self._explainer[1].explain(ExplainQuery(**query))
        if query.get("sentence"):
            from mcl_ray.llm.explain import SentenceWriter, add_sentence

            if self._writer is None or self._writer.cfg != rec.art.cfg.explain:
                self._writer = SentenceWriter(rec.art.cfg.explain)
            add_sentence(out, self._writer)
        return out

    def info(self) -> dict:
        return self._rec.info()


@serve.deployment(name="RecommenderAPI", max_ongoing_requests=64, max_queued_requests=256)
@serve.ingress(api)
class RecommenderAPI:
    def __init__(self, model: DeploymentHandle, scenarios: list[str] | None = None):
        self.model = model
        if scenarios:  # schema-driven clients see the model's scenario names as an enum
            schemas = api.openapi()["components"]["schemas"]  # FastAPI caches this dict: patched once, served as is
            for name in ("RecommendRequest", "ScoreRequest", "ExplainRequest"):
                schemas[name]["properties"]["scenario"]["enum"] = list(scenarios)

    async def _call(self, method: str, payload: dict) -> dict:
        try:
            result = await getattr(self.model, method).remote(payload)
        except BackPressureError:
            raise HTTPException(503, "model deployment overloaded; retry later",
                                headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        if "error" in result:
            raise HTTPException(result["error"], result["detail"])
        return result

    @api.post("/v1/recommend", response_model=RecommendResponse, responses=ERRORS)
    async def recommend(self, req: RecommendRequest, response: Response) -> dict:
        """Top-k items for a user in a scenario: the retrieval index's N candidates (two-stage models)
        or every item, ranked by the multi-scenario model; stage timings in `timings_ms` and the
        Server-Timing header."""
        result = await self._call("recommend", req.model_dump())
        response.headers["Server-Timing"] = ", ".join(f"{k};dur={v}" for k, v in result["timings_ms"].items())
        return result

    @api.post("/v1/score", response_model=ScoreResponse, responses=ERRORS)
    async def score(self, req: ScoreRequest) -> dict:
        """Scores of the given candidate items for a user in a scenario."""
        return await self._call("score", req.model_dump())

    @api.post("/v1/explain", response_model=ExplainResponse, responses=ERRORS)
    async def explain(self, req: ExplainRequest) -> dict:
        """Why this score: per-field integrated-gradients attributions, the user's most similar train-history
        items, and on request (`sentence`) one or two sentences written by the generator from those facts."""
        return await self._call("explain", req.model_dump())

    @api.get("/v1/model")
    async def model_info(self) -> dict:
        """Artifact version, metrics and a summary of the feature spec."""
        return await self.model.info.remote()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        info = await self.model.info.remote()
        return {"status": "ok", "model_version": info["version"]}


class AppArgs(BaseModel):
    """Arguments of `build_app` (strict: a misspelled argument is an error)."""

    model_config = ConfigDict(extra="forbid")
    artifact: str = Field(description="Model artifact folder (mcl-ray export / tune).")
    batch_max_size: int = Field(8, ge=1, le=256)
    batch_wait_ms: float = Field(2.0, ge=0, le=100)
    max_ongoing_requests: Optional[int] = Field(None, ge=1, description="Model deployment override.")
    max_queued_requests: Optional[int] = Field(None, ge=-1, description="Model deployment override.")
    num_replicas: Optional[int] = Field(None, ge=1, description="Fixed replicas instead of autoscaling.")
    num_cpus: Optional[float] = Field(None, gt=0, description="CPUs per model replica.")


def build_app(args: dict) -> serve.Application:
    a = AppArgs.model_validate(args)
    from mcl_ray.artifact import open_artifact

    art = open_artifact(a.artifact)  # fail fast, in the caller, with a clear message
    opts: dict = {}
    if a.max_ongoing_requests is not None:
        opts["max_ongoing_requests"] = a.max_ongoing_requests
    if a.max_queued_requests is not None:
        opts["max_queued_requests"] = a.max_queued_requests
    if a.num_replicas is not None:
        opts.update(num_replicas=a.num_replicas, autoscaling_config=None)
    if a.num_cpus is not None:
        opts["ray_actor_options"] = {"num_cpus": a.num_cpus}
    model = RecommenderModel.options(user_config={"artifact": a.artifact}, **opts).bind(a.batch_max_size, a.batch_wait_ms)
    return RecommenderAPI.bind(model, art.spec.scenario_names)
