"""Grafana from Python: upload the dashboards to an existing Grafana, and write annotations.

Uses ``grafana-client`` (the maintained fork of ``grafana-api``; docs/grafana.md says why) over Grafana's HTTP API:

* ``GET /api/datasources/uid/:uid`` — the Prometheus datasource the dashboards will query exists;
* ``GET /api/folders`` and ``POST /api/folders`` — the target folder, created when missing;
* ``POST /api/dashboards/db`` with ``overwrite: true`` — each dashboard, its datasource references mapped;
* ``POST /api/annotations`` — an organization annotation (or a dashboard's, with ``dashboard_uid``).

Authentication is a service account token (``Authorization: Bearer``) or basic auth, from ``GRAFANA_TOKEN`` or
``GRAFANA_USER`` / ``GRAFANA_PASSWORD`` (or ``user:password@`` in ``GRAFANA_URL``). Every failure becomes a
:class:`GrafanaError` whose message is one line with a hint, for the CLI to print as is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from grafana_client import GrafanaApi
from grafana_client.client import GrafanaException

log = logging.getLogger("fedguard.grafana")

DASHBOARDS_DIR = Path(__file__).resolve().parents[1] / "monitoring" / "grafana" / "dashboards"
DEFAULT_FOLDER = "fedguard"
# The uid the dashboards refer to: monitoring/grafana/provisioning/datasources/prometheus.yml provisions it.
PROVISIONED_DATASOURCE_UID = "fedguard-prometheus"
TIMEOUT_S = 10.0
MAX_UID_LENGTH = 40  # Grafana's limit for folder and dashboard uids

TOKEN_HINT = "set GRAFANA_TOKEN to a service account token (or GRAFANA_USER and GRAFANA_PASSWORD)"


class GrafanaError(Exception):
    """A Grafana call that failed, or a setting that prevents one; ``str()`` is one line with a hint. ``status`` is
    the HTTP status, 0 when Grafana did not answer, None when no request was made (a missing setting)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status

    @property
    def retryable(self) -> bool:
        """Worth sending again later: Grafana unreachable, overloaded or failing, or the credential not accepted yet
        (an operator may fix it). Other 4xx answers reject this very request, so retrying it cannot help."""
        return self.status is not None and (self.status in (0, 401, 403, 408, 429) or self.status >= 500)


def one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def redact(url: str) -> str:
    """``url`` without the password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def credential_from(url: str, token: str | None, user: str | None, password: str | None):
    """The grafana-client credential: a token, or (user, password); None when the URL carries ``user:password@``."""
    if token:
        return token
    if user or password:
        if not (user and password):
            raise GrafanaError(f"GRAFANA_USER and GRAFANA_PASSWORD go together: set both, or {TOKEN_HINT}")
        return (user, password)
    parts = urlsplit(url)
    if parts.username and parts.password:
        return None
    raise GrafanaError(f"no Grafana credential: {TOKEN_HINT}")


def connect(url: str | None = None, token: str | None = None, user: str | None = None, password: str | None = None,
            *, env: Mapping[str, str] | None = None, timeout_s: float = TIMEOUT_S) -> GrafanaApi:
    """A grafana-client API object for the Grafana at ``url`` (default ``GRAFANA_URL``), authenticated with
    ``token`` (default ``GRAFANA_TOKEN``) or ``user``/``password`` (``GRAFANA_USER``/``GRAFANA_PASSWORD``).
    Makes no request: the first call reports an unreachable Grafana or a rejected credential."""
    env = os.environ if env is None else env
    url = url or env.get("GRAFANA_URL")
    if not url:
        raise GrafanaError("no Grafana URL: set GRAFANA_URL, e.g. GRAFANA_URL=http://localhost:3000")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GrafanaError(f"GRAFANA_URL must look like http://host:3000 (with the sub-path if Grafana is served "
                           f"under one), got {redact(url)!r}")
    credential = credential_from(url, token or env.get("GRAFANA_TOKEN"), user or env.get("GRAFANA_USER"),
                                 password or env.get("GRAFANA_PASSWORD"))
    return GrafanaApi.from_url(with_trailing_slash(url), credential=credential, timeout=timeout_s)


def with_trailing_slash(url: str) -> str:
    """grafana-client appends ``api`` to the URL's path as is: a sub-path must end with ``/`` to give ``/sub/api``."""
    parts = urlsplit(url)
    return url if parts.path.endswith("/") or not parts.path else urlunsplit(parts._replace(path=parts.path + "/"))


def origin(client: GrafanaApi) -> str:
    """``scheme://host[:port]`` of the client's Grafana (no credentials): Grafana's links are absolute paths."""
    c = client.client
    return f"{c.url_protocol}://{c.url_host}" + (f":{c.url_port}" if c.url_port else "")


def describe(error: Exception, action: str, url: str) -> GrafanaError:
    """One line with a hint for a failed call (``action``: what was being done, e.g. "create folder 'fedguard'")."""
    status = getattr(error, "status_code", 0) or 0
    detail = _detail(error)
    if (isinstance(error, GrafanaException) and status == 0) or isinstance(error, (requests.RequestException,
                                                                                    OSError)):
        return GrafanaError(f"Grafana at {url} is unreachable ({action}: {detail}): check GRAFANA_URL and that "
                            f"Grafana is running", 0)
    if status == 401:
        return GrafanaError(f"Grafana at {url} rejected the credential (401, {action}): {TOKEN_HINT}; tokens "
                            f"are made under Administration > Users and access > Service accounts", 401)
    if status == 403:
        return GrafanaError(f"Grafana refused to {action} (403: {detail}): give the service account the Editor "
                            f"role, or Admin to read data sources", 403)
    if status == 404:
        return GrafanaError(f"Grafana at {url} answered 404 to {action} ({detail}): check that GRAFANA_URL "
                            f"is Grafana's root URL, with its sub-path if it is served under one", 404)
    if status == 400 and "provisioned" in detail.lower():
        return GrafanaError(f"Grafana refused to {action} ({detail}): that Grafana provisions this dashboard from "
                            f"files; push to another Grafana, or drop the file provisioning there", 400)
    if status >= 500:
        return GrafanaError(f"Grafana failed to {action} ({status}: {detail}): see Grafana's server log", status)
    return GrafanaError(f"Grafana rejected the request to {action} ({status}: {detail}): check the Grafana "
                        f"version (9 or later) and the input", status)


def _detail(error: Exception) -> str:
    """What went wrong, short: Grafana's message, or the innermost reason of a connection failure."""
    response = getattr(error, "response", None)
    if isinstance(response, dict) and response.get("message"):
        return one_line(response["message"], 160)
    text = str(error.message) if isinstance(error, GrafanaException) else str(error)
    reason = re.findall(r"\[Errno -?\d+\] [^'\")]+|timed out|Name or service not known", text)
    return reason[-1] if reason else one_line(f"{type(error).__name__}: {text}", 160)


def call(client: GrafanaApi, action: str, fn, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``, any failure turned into a :class:`GrafanaError`."""
    try:
        return fn(*args, **kwargs)
    except GrafanaError:
        raise
    except (GrafanaException, requests.RequestException, OSError) as error:
        raise describe(error, action, redact(client.url or origin(client))) from error


# -- dashboards ---------------------------------------------------------------------------------------------------
def load_dashboards(directory: Path | str = DASHBOARDS_DIR) -> list[dict[str, Any]]:
    """Every ``*.json`` dashboard in ``directory``, by file name."""
    directory = Path(directory)
    paths = sorted(directory.glob("*.json"))
    if not paths:
        raise GrafanaError(f"no dashboard JSON in {directory}: pass the directory of the fedguard dashboards "
                           f"(monitoring/grafana/dashboards in the repository)")
    out = []
    for path in paths:
        try:
            dashboard = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise GrafanaError(f"cannot read dashboard {path}: {error}: fix or remove the file") from error
        if not isinstance(dashboard, dict) or not dashboard.get("title"):
            raise GrafanaError(f"{path} is not a dashboard (a JSON object with a title): fix or remove the file")
        out.append(dashboard)
    return out


def map_datasource(obj: Any, old_uid: str, new_uid: str) -> Any:
    """A copy of ``obj`` in which every datasource reference ``{"uid": old_uid, ...}`` points at ``new_uid``."""
    if isinstance(obj, dict):
        out = {key: map_datasource(value, old_uid, new_uid) for key, value in obj.items()}
        ref = out.get("datasource")
        if isinstance(ref, dict) and ref.get("uid") == old_uid:
            out["datasource"] = {**ref, "uid": new_uid}
        return out
    if isinstance(obj, list):
        return [map_datasource(value, old_uid, new_uid) for value in obj]
    return obj


def dashboard_request(dashboard: dict[str, Any], folder_uid: str, datasource_uid: str) -> dict[str, Any]:
    """The body of ``POST /api/dashboards/db``: the dashboard (``id`` null: matched by uid, created when new),
    its datasource mapped, saved into ``folder_uid`` over whatever has the same uid."""
    body = map_datasource(dashboard, PROVISIONED_DATASOURCE_UID, datasource_uid)
    body["id"] = None
    return {"dashboard": body, "folderUid": folder_uid, "overwrite": True, "message": "fedguard grafana push"}


def folder_uid_for(title: str) -> str:
    """A stable uid for the folder ``title`` (letters, digits, ``-`` and ``_``; at most 40 characters)."""
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "-" for ch in title.strip().lower())
    return (cleaned.strip("-") or "fedguard")[:MAX_UID_LENGTH]


def check_datasource(client: GrafanaApi, uid: str) -> dict[str, Any]:
    """The target Grafana's datasource ``uid``, which must be a Prometheus one."""
    try:
        found = call(client, f"read data source {uid!r}", client.datasource.get_datasource_by_uid, uid)
    except GrafanaError as error:
        if error.status == 404:
            raise GrafanaError(f"Grafana has no data source with uid {uid!r}: pass --datasource-uid with the uid of "
                               f"its Prometheus data source (Connections > Data sources: the uid ends the URL)",
                               404) from error
        raise
    if found.get("type") != "prometheus":
        raise GrafanaError(f"data source {uid!r} is of type {found.get('type')!r}, the dashboards need a "
                           f"Prometheus one: pass --datasource-uid with the uid of a Prometheus data source")
    return found


def ensure_folder(client: GrafanaApi, title: str) -> str:
    """The uid of the folder titled ``title``, created when missing."""
    def find() -> str | None:
        folders = call(client, "list folders", client.folder.get_all_folders)
        return next((f["uid"] for f in folders if f.get("title") == title), None)

    uid = find()
    if uid is not None:
        return uid
    try:
        created = call(client, f"create folder {title!r}", client.folder.create_folder, title,
                       uid=folder_uid_for(title))
        return created["uid"]
    except GrafanaError as error:
        if error.status == 409:  # made meanwhile, or its uid is taken by a folder of another title
            uid = find()
            if uid is not None:
                return uid
            raise GrafanaError(f"folder uid {folder_uid_for(title)!r} is taken by a folder of another title: "
                               f"pass another --folder", 409) from error
        raise


def push_dashboards(client: GrafanaApi, directory: Path | str = DASHBOARDS_DIR, folder: str = DEFAULT_FOLDER,
                    datasource_uid: str = PROVISIONED_DATASOURCE_UID) -> list[tuple[str, str, str]]:
    """Upload every dashboard of ``directory`` into ``folder`` (created when missing), overwriting the dashboards
    with the same uid, their queries pointed at the target's Prometheus datasource ``datasource_uid``.
    Returns (title, uid, url) per dashboard."""
    dashboards = load_dashboards(directory)
    check_datasource(client, datasource_uid)
    folder_uid = ensure_folder(client, folder)
    pushed = []
    for dashboard in dashboards:
        title = dashboard["title"]
        saved = call(client, f"save dashboard {title!r}", client.dashboard.update_dashboard,
                     dashboard_request(dashboard, folder_uid, datasource_uid))
        url = saved.get("url", "")
        pushed.append((title, saved.get("uid", dashboard.get("uid", "")),
                       origin(client) + url if url.startswith("/") else url))
        log.info("pushed dashboard %r (uid %s) into folder %r", title, saved.get("uid"), folder)
    return pushed


# -- annotations --------------------------------------------------------------------------------------------------
def epoch_ms(at: float) -> int:
    """Seconds since the epoch as Grafana's annotation time: integer milliseconds."""
    return int(round(at * 1000))


def annotate(client: GrafanaApi, text: str, tags: Iterable[str], at: float | None = None,
             dashboard_uid: str | None = None, end: float | None = None) -> int:
    """Write an annotation at ``at`` (seconds since the epoch; default now; a region up to ``end`` if given) and
    return its id. Without ``dashboard_uid`` it is an organization annotation: dashboards show it through an
    annotation query on the Grafana data source filtered by its tags."""
    at = time.time() if at is None else at
    answer = call(client, "create annotation", client.annotations.add_annotation, dashboard_uid=dashboard_uid,
                  time_from=epoch_ms(at), time_to=None if end is None else epoch_ms(end), tags=list(tags),
                  text=text)
    return int(answer.get("id", 0)) if isinstance(answer, dict) else 0
