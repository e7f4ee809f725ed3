"""Serving: the recommender core and the HTTP API schema (the Ray Serve app is in serve_apps/)."""
