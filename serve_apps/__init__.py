"""Ray Serve applications (the serving issue adds the recommendation app here)."""
