"""pushd: the WebSocket push system of a digital-currency exchange, on Trio."""

from importlib.metadata import PackageNotFoundError, version

try:  # one place for the version: pyproject.toml, as installed
    __version__ = version("pushd")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
