"""`python -m mcl_ray ...` is `mcl-ray ...` with no console script on PATH: a Ray job's entrypoint
names the interpreter mcl-ray is installed in and works whatever the head's shell environment."""

from mcl_ray.cli import main

if __name__ == "__main__":
    main()
