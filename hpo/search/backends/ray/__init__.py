"""The Ray Tune backend: Tune schedulers under the Optuna pruners' names (schedulers.py), the
space as Tune domains (space.py), placement and the runtime, the driver's side of a running
search (driver.py), the classes handed to Tune (tune.py, which imports Ray) and the backend and
its study (backend.py)."""
