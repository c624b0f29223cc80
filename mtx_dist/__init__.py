"""mtx-dist: distributed contrastive pretraining of the Meta-Transformer shared encoder."""


def package_version() -> str:
    """The installed distribution's version ("unknown" when run from a tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("mtx-dist")
    except PackageNotFoundError:
        return "unknown"
