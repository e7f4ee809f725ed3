"""Ray Serve applications (deployed by import path, e.g. serve_apps.recommender:build_app)."""
