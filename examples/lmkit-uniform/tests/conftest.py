"""Make the plugin's contract fixtures available and the plugin registered, installed or not.

Installed (``pip install .``), lmkit's pytest plugin provides the fixtures and the ``lmkit``
entry point registers ``uniform``; from a plain checkout, both happen here.
"""

pytest_plugins = ["lmkit.testing"]  # a no-op when lmkit's pytest11 entry point loaded it


def pytest_configure(config):
    from lmkit.testing import ensure_plugin

    import lmkit_uniform

    ensure_plugin(lmkit_uniform, "uniform", "lmkit-uniform", lmkit_uniform.__version__)
